#!/usr/bin/env python3
"""Where the time of one ScaleKD training step goes.

Builds the ScaleKD task of a recipe (``--config recipes/X.yaml``) or of a model pair
(``--model S --teacher T --img-size N --num-classes K``) with random weights (pretrained=False,
nothing is downloaded) and times, on one fixed batch:

    data           one batch from a timm loader (synthetic in-memory images, or --data-dir)
    teacher_fwd    teacher forward without gradients (logits and the target map T4)
    student_fb     student forward + backward alone, plain student loss
    heads_fb       projectors + teacher tail + feature/KD losses, forward + backward
    optimizer      optimizer.step() over the student and the projectors
    scalekd_step   the full step: task forward + backward + optimizer step
    student_step   a plain student-only training step (no teacher), for the overhead ratio
    reference_step the released algorithm (benchmarks/reference_step.py), fp32
    step_with_data loader batch + full step (shows whether data loading hides behind compute)

The compute parts run round-robin (one of each per round, medians over --steps rounds after
--warmup rounds), so load from other processes hits all of them alike. FLOPs come from
torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention; forward and backward).

    python benchmarks/step_breakdown.py --model scalekd_demo_resnet --teacher scalekd_demo_vit \\
        --img-size 32 --num-classes 10 -b 32 --device cpu -j 0 --json out.json
    python benchmarks/step_breakdown.py --config recipes/swinl_r50.yaml -b 64 --amp --channels-last

Every train_kd.py flag is accepted (--opt, --lr, --model-kwargs, --teacher-kwargs, ...). --amp
means bf16 autocast here; the reference step always runs in fp32 like the released code.
"""
import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from functools import partial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count  # noqa: E402

from timm.data import create_dataset, resolve_data_config  # noqa: E402
from timm.models import create_model, is_model, split_model_name_tag  # noqa: E402
from timm.optim import create_optimizer_v2, optimizer_kwargs  # noqa: E402
from timm.utils import unwrap_model  # noqa: E402

import models  # noqa: E402,F401  registers the demo models
import train_kd  # noqa: E402
from config import parse_args_with_recipe  # noqa: E402
from distillers import build_task  # noqa: E402
from distillers.flags import criterion_kwargs, task_kwargs  # noqa: E402
from distillers.base import kd_loss  # noqa: E402
from models.features import forward_student  # noqa: E402
from benchmarks.reference_step import reference_forward  # noqa: E402

# the parts whose sum the full step is compared with
STEP_PARTS = ('teacher_fwd', 'student_fb', 'heads_fb', 'optimizer')
DESCRIPTIONS = {
    'data': 'timm loader, one batch (loader alone)',
    'teacher_fwd': 'teacher forward, no grad',
    'student_fb': 'student fwd+bwd, plain loss',
    'heads_fb': 'projectors+tail+losses fwd+bwd',
    'optimizer': 'optimizer.step()',
    'sum_of_parts': 'sum of the four parts above',
    'scalekd_step': 'full ScaleKD step',
    'student_step': 'plain student step',
    'reference_step': 'reference step (released algo, fp32)',
    'scalekd_step_fp32': 'full ScaleKD step, fp32',
    'step_with_data': 'loader batch + full ScaleKD step',
}


class SyntheticImages(torch.utils.data.Dataset):
    """A fixed pool of random RGB PIL images, cycled to ``length`` samples; timm sets ``transform``."""

    def __init__(self, length: int, size: int, num_classes: int, pool: int = 16, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(pool)]
        self.length = length
        self.num_classes = num_classes
        self.transform = None
        self.target_transform = None

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        img = self.images[index % len(self.images)]
        if self.transform is not None:
            img = self.transform(img)
        return img, index % self.num_classes


def _bench_parser():
    parser = argparse.ArgumentParser(
        description='Time the parts of a ScaleKD training step (random weights, synthetic data).',
        epilog='All train_kd.py flags are accepted as well: --config, --model, --teacher, --img-size, --num-classes, '
               '-b/--batch-size, --device, --amp (bf16 autocast here), --channels-last, -j/--workers, --data-dir, '
               '--opt, --lr, --model-kwargs, --teacher-kwargs, --scalekd-*, ...')
    parser.add_argument('--steps', type=int, default=10,
                        help='timed rounds; each part runs once per round (default 10)')
    parser.add_argument('--warmup', type=int, default=3, help='untimed rounds first (default 3)')
    parser.add_argument('--json', default='', metavar='PATH', help='write the results as JSON here')
    parser.add_argument('--no-reference', action='store_true', help='skip the reference step')
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (CPU)')
    parser.add_argument('--no-heap-cache', action='store_true',
                        help='CPU: keep glibc returning large freed blocks to the OS (default: keep them, so that '
                             'page faults of fresh allocations do not depend on which part ran before)')
    parser.add_argument('--synthetic-size', type=int, default=None,
                        help='side of the synthetic source images (default: image size / 0.875)')
    return parser


def parse_args(argv=None):
    bench, rest = _bench_parser().parse_known_args(argv)
    parser = train_kd.build_parser()
    args, _ = parse_args_with_recipe(parser, rest)
    if not args.teacher:
        parser.error('the benchmark needs a teacher: pass --teacher NAME (e.g. swin_large_patch4_window7_224) '
                     'or a --config recipe that sets one')
    for name in (args.model, args.teacher):
        if not is_model(split_model_name_tag(name)[0]):
            parser.error(f"unknown model '{name}'; use a timm model name (timm.list_models() lists them)")
    if bench.steps < 1 or bench.warmup < 0:
        parser.error('--steps must be >= 1 and --warmup >= 0')
    args.distiller = 'scalekd'
    return bench, args


# --- measurement helpers ------------------------------------------------------------------------
def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, query, key, value)


def count_flops(fn) -> int:
    """FLOPs of one call of ``fn`` (matmul/conv/attention, forward and backward)."""
    aten = torch.ops.aten
    mapping = {}
    # the CPU attention kernels are not in torch's table; count them like the GPU ones
    if hasattr(aten, '_scaled_dot_product_flash_attention_for_cpu'):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def keep_heap_memory() -> bool:
    """Ask glibc to serve every CPU allocation from a heap it never trims (mallopt via ctypes).

    By default glibc maps large blocks (over a dynamic threshold of up to 32 MB) fresh on every allocation
    and unmaps them on free, so a part pays page faults for memory the part before it did not leave
    behind. That makes CPU times depend on the order of the parts; on a GPU the caching allocator keeps
    memory. Returns whether glibc accepted the settings.
    """
    import ctypes
    import ctypes.util
    name = ctypes.util.find_library('c')
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2 ** 31 - 1))
    except (OSError, AttributeError):
        return False


def _peak_mem_mb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _reset_peak(device):
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


class Timer:
    """Collects per-part wall times (synchronised) and peak memory."""

    def __init__(self, device):
        self.device = device
        self.times = {}
        self.peak = {}

    def run(self, name, fn, record=True):
        _sync(self.device)
        _reset_peak(self.device)
        t0 = time.perf_counter()
        fn()
        _sync(self.device)
        dt = time.perf_counter() - t0
        if record:
            self.times.setdefault(name, []).append(dt)
            self.peak[name] = max(self.peak.get(name, 0.), _peak_mem_mb(self.device))

    def median_ms(self, name):
        return statistics.median(self.times[name]) * 1e3

    def min_ms(self, name):
        return min(self.times[name]) * 1e3


# --- building -----------------------------------------------------------------------------------
def build(args, bench):
    device = torch.device(args.device)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)

    dataset = None
    num_classes = args.num_classes
    if args.data_dir:
        dataset = create_dataset(args.dataset, root=args.data_dir, split=args.train_split, is_training=True,
                                 class_map=args.class_map, input_img_mode=args.input_img_mode)
        num_classes = num_classes or train_kd.num_classes(dataset)
    num_classes = num_classes or 1000
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else 3)

    student = create_model(
        args.model, pretrained=False, in_chans=in_chans, num_classes=num_classes, drop_rate=args.drop,
        drop_path_rate=args.drop_path, global_pool=args.gp, bn_momentum=args.bn_momentum, bn_eps=args.bn_eps,
        **args.model_kwargs)
    teacher_kwargs = dict(args.teacher_kwargs)
    if args.teacher_img_size:
        teacher_kwargs['img_size'] = args.teacher_img_size
    teacher = create_model(args.teacher, pretrained=False, in_chans=in_chans, num_classes=num_classes,
                           **teacher_kwargs)
    teacher.requires_grad_(False).eval()

    data_config = resolve_data_config(vars(args), model=student, verbose=False)
    img_size = tuple(data_config['input_size'][-2:])
    task = build_task('scalekd', student, teacher, criterion_kwargs=criterion_kwargs(args), device=device,
                      mean=data_config['mean'], std=data_config['std'], verbose=False,
                      **task_kwargs(args, img_size))
    task.to(device=device)
    if args.channels_last:
        task.to(memory_format=torch.channels_last)
    task.train()

    if args.lr is None:
        args.lr = args.lr_base * args.batch_size / args.lr_base_size
    opt_kwargs = dict(optimizer_kwargs(cfg=args), **args.opt_kwargs)
    optimizer = create_optimizer_v2(task.get_trainable_module(), **opt_kwargs)
    student_optimizer = create_optimizer_v2(student, **opt_kwargs)

    # loader: synthetic images (source side ~ image size / 0.875) unless --data-dir
    rounds = bench.warmup + bench.steps
    if dataset is None:
        side = bench.synthetic_size or int(math.ceil(max(img_size) / 0.875))
        dataset = SyntheticImages(args.batch_size * (rounds + 2), side, num_classes, seed=args.seed)
    loader = train_kd.create_train_loader(dataset, args, data_config, device, persistent_workers=args.workers > 0)
    if len(loader) < 1:
        raise SystemExit(f'the data holds fewer images ({len(dataset)}) than one batch ({args.batch_size}); '
                         f'lower --batch-size')
    return dict(device=device, task=task, student=student, optimizer=optimizer,
                student_optimizer=student_optimizer, loader=loader, img_size=img_size, num_classes=num_classes)


class LoaderCycle:
    """Endless batches from a loader, on the device (and channels-last when asked)."""

    def __init__(self, loader, device, channels_last):
        self.loader, self.device, self.channels_last = loader, device, channels_last
        self.it = iter(loader)

    def next(self):
        try:
            x, y = next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            x, y = next(self.it)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y


# --- the parts ----------------------------------------------------------------------------------
def heads_forward(task, s3, s4, logits, teacher_logits, t4):
    """The ScaleKD terms after the student, through the task's own methods: projectors and teacher tail
    (``ScaleKDModule.heads``), feature losses (``ScaleKDTask.feature_losses``) and logit KD, weighted."""
    maps = unwrap_model(task.trainable_module).heads(s3, s4)
    loss = task.loss_weights['loss_kd'] * kd_loss(logits, teacher_logits, task.kd_temperature)
    for k, v in task.feature_losses(maps, t4).items():
        loss = loss + task.loss_weights[k] * v
    return loss


def make_parts(ctx, x, y, amp):
    task, student = ctx['task'], ctx['student']
    optimizer, student_optimizer = ctx['optimizer'], ctx['student_optimizer']
    module = unwrap_model(task.trainable_module)
    loss_cls_w = task.loss_weights['loss_cls']

    # fixed inputs of the heads part: student features and teacher targets as leaves
    with torch.no_grad(), amp():
        logits, s3, s4 = forward_student(student, x, module.taps)
        teacher_logits, t4 = task.teacher_targets(x)
    leaves = [t.detach().requires_grad_() for t in (s3, s4, logits)]

    def teacher_fwd():
        with amp():
            task.teacher_targets(x)

    def student_fb():
        student.zero_grad(set_to_none=True)
        with amp():
            loss = loss_cls_w * task.criterion(student(x), y)
        loss.backward()

    def heads_fb():
        module.caps.zero_grad(set_to_none=True)
        for t in leaves:
            t.grad = None
        with amp():
            loss = heads_forward(task, leaves[0], leaves[1], leaves[2], teacher_logits, t4)
        loss.backward()

    def optimizer_step():  # uses the gradients the full step left behind
        optimizer.step()

    def scalekd_step(autocast=amp):
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            out = task(x, y)
        out['loss'].backward()
        optimizer.step()

    def student_step():
        student_optimizer.zero_grad(set_to_none=True)
        with amp():
            loss = task.criterion(student(x), y)
        loss.backward()
        student_optimizer.step()

    def reference_step():
        optimizer.zero_grad(set_to_none=True)
        out = reference_forward(task, x, y)  # fp32, no autocast
        out['loss'].backward()
        optimizer.step()

    return dict(teacher_fwd=teacher_fwd, student_fb=student_fb, heads_fb=heads_fb, optimizer=optimizer_step,
                scalekd_step=scalekd_step, scalekd_step_fp32=partial(scalekd_step, autocast=nullcontext),
                student_step=student_step, reference_step=reference_step)


def check_reference(task, x, y):
    """Largest relative difference of the loss terms, optimised step vs reference (fp32, no grad)."""
    with torch.no_grad():
        a = task(x.float(), y)
        b = reference_forward(task, x, y)
    return max(abs(float(a[k]) - float(b[k])) / max(abs(float(b[k])), 1e-12) for k in b if k.startswith('loss'))


def run_benchmark(bench, args):
    if bench.threads:
        torch.set_num_threads(bench.threads)
    heap_cache = False
    if torch.device(args.device).type == 'cpu' and not bench.no_heap_cache:
        heap_cache = keep_heap_memory()
    ctx = build(args, bench)
    device, task = ctx['device'], ctx['task']
    amp = partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16) if args.amp else nullcontext
    timer = Timer(device)
    batches = LoaderCycle(ctx['loader'], device, args.channels_last)

    # 1) data loading alone (the loader's own throughput, nothing else running)
    for i in range(bench.warmup + bench.steps):
        timer.run('data', batches.next, record=i >= bench.warmup)
    x, y = batches.next()
    ref_diff = check_reference(task, x, y)

    # 2) the compute parts, round-robin on one fixed batch
    parts = make_parts(ctx, x, y, amp)
    order = ['teacher_fwd', 'student_fb', 'heads_fb', 'student_step', 'scalekd_step', 'optimizer']
    if args.amp:
        order.append('scalekd_step_fp32')
    if not bench.no_reference:
        order.append('reference_step')

    def step_with_data():
        xb, yb = batches.next()
        optimizer = ctx['optimizer']
        optimizer.zero_grad(set_to_none=True)
        with amp():
            out = task(xb, yb)
        out['loss'].backward()
        optimizer.step()

    for i in range(bench.warmup + bench.steps):
        for name in order:
            timer.run(name, parts[name], record=i >= bench.warmup)
        timer.run('step_with_data', step_with_data, record=i >= bench.warmup)

    # 3) FLOPs, one untimed call each
    flops = {name: count_flops(parts[name]) for name in order}
    flops['data'] = 0
    flops['step_with_data'] = flops['scalekd_step']

    B = x.shape[0]
    ms = {name: timer.median_ms(name) for name in timer.times}
    ms['sum_of_parts'] = sum(ms[p] for p in STEP_PARTS)
    fastest = {name: timer.min_ms(name) for name in timer.times}
    fastest['sum_of_parts'] = sum(fastest[p] for p in STEP_PARTS)
    flops['sum_of_parts'] = sum(flops[p] for p in STEP_PARTS)
    step_ms = ms['scalekd_step']
    rows = {}
    for name in ['data', *STEP_PARTS, 'sum_of_parts', 'scalekd_step', 'student_step', 'scalekd_step_fp32',
                 'reference_step', 'step_with_data']:
        if name not in ms:
            continue
        gflop = flops[name] / 1e9
        rows[name] = dict(
            description=DESCRIPTIONS[name], ms=ms[name], min_ms=fastest[name], share=ms[name] / step_ms, gflop=gflop,
            gflops_per_s=gflop / (ms[name] / 1e3) if gflop else None,
            img_per_s=B / (ms[name] / 1e3),
            peak_mem_mb=timer.peak.get(name, max(timer.peak[p] for p in STEP_PARTS)),
        )
    result = dict(
        model=args.model, teacher=args.teacher, config=args.config or None, img_size=list(ctx['img_size']),
        num_classes=ctx['num_classes'], batch_size=B, device=str(device), device_name=_device_name(device),
        amp='bfloat16' if args.amp else None, channels_last=bool(args.channels_last), steps=bench.steps,
        warmup=bench.warmup, threads=torch.get_num_threads(), workers=args.workers, optimizer=args.opt,
        data='ImageFolder ' + args.data_dir if args.data_dir else 'synthetic in-memory images',
        peak_memory_kind='torch.cuda.max_memory_allocated during the part' if device.type == 'cuda'
        else 'process ru_maxrss high-water mark (cumulative)',
        cpu_heap_cache=heap_cache, reference_dtype='float32', reference_max_rel_loss_diff=ref_diff,
        parts=rows,
        sum_of_parts_ms=ms['sum_of_parts'],
        ratio_step_to_sum_of_parts=step_ms / ms['sum_of_parts'],
        ratio_step_to_student_step=step_ms / ms['student_step'],
    )
    # the same ratios from the fastest round of each part (less sensitive to other load on the machine)
    result['ratios_from_min'] = dict(
        ratio_step_to_sum_of_parts=fastest['scalekd_step'] / fastest['sum_of_parts'],
        ratio_step_to_student_step=fastest['scalekd_step'] / fastest['student_step'])
    if not bench.no_reference:
        result['speedup_vs_reference'] = ms['reference_step'] / step_ms
        result['ratios_from_min']['speedup_vs_reference'] = fastest['reference_step'] / fastest['scalekd_step']
        if args.amp:
            result['speedup_vs_reference_same_precision'] = ms['reference_step'] / ms['scalekd_step_fp32']
    result['targets'] = dict(
        step_le_1_10x_sum_of_parts=result['ratio_step_to_sum_of_parts'] <= 1.10,
        speedup_vs_reference_ge_1_5x=result.get('speedup_vs_reference', 0.) >= 1.5)
    return result


def _device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    import platform
    return platform.processor() or platform.machine()


def format_table(r):
    mem_head = 'peak MB' if r['device'].startswith('cuda') else 'maxRSS MB'
    lines = [f"ScaleKD step breakdown: {r['teacher']} -> {r['model']} @ {r['img_size'][0]}x{r['img_size'][1]}, "
             f"batch {r['batch_size']}, {r['device']} ({r['device_name']}), "
             f"{'bf16 autocast' if r['amp'] else 'fp32'}{', channels-last' if r['channels_last'] else ''}, "
             f"{r['threads']} threads{', glibc heap kept' if r['cpu_heap_cache'] else ''}, median of {r['steps']}",
             f"{'part':<18} {'ms':>9} {'share':>6} {'GFLOP':>8} {'GFLOP/s':>9} {'img/s':>8} {mem_head:>9}  what",
             '-' * 110]
    for name, row in r['parts'].items():
        gfs = f"{row['gflops_per_s']:.1f}" if row['gflops_per_s'] else '-'
        gflop = f"{row['gflop']:.2f}" if row['gflop'] else '-'
        lines.append(f"{name:<18} {row['ms']:>9.2f} {100 * row['share']:>5.0f}% {gflop:>8} {gfs:>9} "
                     f"{row['img_per_s']:>8.1f} {row['peak_mem_mb']:>9.0f}  {row['description']}")
        if name == 'sum_of_parts':
            lines.append('-' * 110)
    lines.append('-' * 110)
    lines.append(f"full step / sum of parts     : {r['ratio_step_to_sum_of_parts']:.3f}  (target <= 1.10: "
                 f"{'met' if r['targets']['step_le_1_10x_sum_of_parts'] else 'NOT met'})")
    lines.append(f"full step / plain student    : {r['ratio_step_to_student_step']:.3f}")
    if 'speedup_vs_reference' in r:
        lines.append(f"speed-up vs reference step   : {r['speedup_vs_reference']:.3f}x  (target >= 1.5: "
                     f"{'met' if r['targets']['speedup_vs_reference_ge_1_5x'] else 'NOT met'})")
    if 'speedup_vs_reference_same_precision' in r:
        lines.append(f"  same precision (fp32 step) : {r['speedup_vs_reference_same_precision']:.3f}x")
    lines.append('from the fastest round       : ' + ', '.join(
        f'{k} {v:.3f}' for k, v in r['ratios_from_min'].items()))
    lines.append(f"reference vs optimised losses: max relative difference {r['reference_max_rel_loss_diff']:.2e}")
    return '\n'.join(lines)


def main(argv=None):
    bench, args = parse_args(argv)
    result = run_benchmark(bench, args)
    print(format_table(result), flush=True)
    if bench.json:
        os.makedirs(os.path.dirname(os.path.abspath(bench.json)), exist_ok=True)
        with open(bench.json, 'w') as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
