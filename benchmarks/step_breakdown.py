#!/usr/bin/env python3
"""Where the time of one ScaleKD training step goes, eager or compiled.

Builds the ScaleKD task of a recipe (``--config recipes/X.yaml``) or of a model pair
(``--model S --teacher T --img-size N --num-classes K``) with random weights (pretrained=False,
nothing is downloaded) and times, on one fixed batch:

    data           the loader alone on JPEG files (decode, the run's augmentation), back to back over
                   3x its prefetch depth after the queue was drained once
    teacher_fwd    teacher forward without gradients (logits and the target map T4)
    student_fb     student forward + backward alone, plain student loss          (eager only)
    heads_fb       projectors + teacher tail + feature/KD losses, fwd + bwd      (eager only)
    optimizer      optimizer.step() over the student and the projectors
    task_fwd       the task's own forward, ``task(x, y)``, without the backward
    scalekd_step   the full step: task forward + backward + optimizer step
    student_step   a plain student-only training step (no teacher)              (eager only)
    reference_step the released algorithm (benchmarks/reference_step.py), at the same precision
    trainer_step   train_kd.py's own loop (``train_one_epoch``) over the JPEG loader, back to back; its
                   img/s is the StepTimer figure the console line prints

The compute parts run round-robin (one of each per round, medians over --steps rounds after
--warmup rounds), so load from other processes hits all of them alike. FLOPs come from
torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention; forward and backward),
counted eagerly before anything is compiled.

    python benchmarks/step_breakdown.py --model scalekd_demo_resnet --teacher scalekd_demo_vit \\
        --img-size 32 --num-classes 10 -b 32 --device cpu -j 0 --json out.json
    python benchmarks/step_breakdown.py --config recipes/swinl_r50.yaml --torchcompile \\
        --torchcompile-mode reduce-overhead

Every train_kd.py flag is accepted (--opt, --lr, --model-kwargs, --teacher-kwargs, --amp, --channels-last,
--torchcompile, --torchcompile-mode, ...). --amp means bf16 autocast here, with the teacher held in bf16 as
train_kd.py holds it; the reference step runs at the same precision as the step.
"""
import argparse
import atexit
import itertools
import json
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
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
from runtime.device import check_compile, check_precision  # noqa: E402
from runtime.metrics import StepTimer  # noqa: E402
from runtime.nonfinite import NonFiniteGuard  # noqa: E402
from runtime.resume import EpochPosition  # noqa: E402
from runtime.students import StudentRun  # noqa: E402

# the parts whose sum the full step is compared with
STEP_PARTS = ('teacher_fwd', 'student_fb', 'heads_fb', 'optimizer')
EAGER_ONLY = ('student_fb', 'heads_fb', 'student_step')  # they call the uncompiled student / heads
DESCRIPTIONS = {
    'data': 'loader alone, JPEG decode + augmentation',
    'teacher_fwd': 'teacher forward, no grad',
    'student_fb': 'student fwd+bwd, plain loss',
    'heads_fb': 'projectors+tail+losses fwd+bwd',
    'optimizer': 'optimizer.step()',
    'sum_of_parts': 'sum of the four parts above',
    'task_fwd': "the task's own forward, task(x, y)",
    'scalekd_step': 'full ScaleKD step',
    'student_step': 'plain student step',
    'reference_step': 'reference step (released algo, same precision)',
    'trainer_step': "train_kd.py's loop on the JPEG loader",
}
# dense (no sparsity) bf16 tensor-core peak in TFLOP/s from the vendors' data sheets, by a part of the device
# name; the first match wins (so 'H100 PCIe' before 'H100', 'L40S' before 'L4', 'A100' before 'A10')
DENSE_BF16_PEAK_TFLOPS = (
    ('H200', 989.4), ('GH200', 989.4), ('H100 PCIe', 756.0), ('H100 NVL', 835.0), ('H100', 989.4),
    ('B200', 2250.0), ('A100', 312.0), ('L40S', 362.1), ('L40', 181.0), ('L4', 121.0), ('A10G', 70.0),
    ('A10', 125.0), ('RTX 4090', 165.2), ('RTX 6000 Ada', 364.2),
)


def dense_bf16_peak(device_name: str):
    """(table entry, TFLOP/s) for a CUDA device name, or (None, None) when the table does not know it."""
    for key, tflops in DENSE_BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return key, tflops
    return None, None


def prefetch_depth(workers: int) -> int:
    """Batches a loader holds ready: ``workers`` x torch's prefetch_factor 2, plus timm's prefetcher's one."""
    return workers * 2 + 1 if workers > 0 else 1


def write_jpeg_folder(root: str, count: int, size, num_classes: int, seed: int = 0) -> str:
    """``count`` JPEG files (quality 90, ``size`` = (W, H)) in an ImageFolder ``root``/train/<class>/; smooth random
    content with fine noise, so decoding costs about what a photo of that size costs. Returns ``root``."""
    tag = f'{size[0]}x{size[1]}-{num_classes}'
    done = os.path.join(root, '.complete')
    if os.path.exists(done):  # written before: reused when it holds enough files of this kind
        have_tag, have = open(done).read().split()
        if have_tag == tag and int(have) >= count:
            return root
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(count):
        d = os.path.join(root, 'train', f'class{i % num_classes:04d}')
        os.makedirs(d, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8))
        img = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.int16)
        img = (img + rng.integers(-12, 13, img.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(d, f'{i:06d}.jpg'), quality=90)
    with open(done, 'w') as f:
        f.write(f'{tag} {count}')
    return root


class FirstBatches:
    """The first ``n`` batches of a loader, as a loader of length ``n`` (train_kd's loop runs over all of it)."""

    def __init__(self, loader, n: int):
        self.loader, self.n = loader, min(n, len(loader))
        self.dataset = loader.dataset

    def __len__(self):
        return self.n

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.n)


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
    parser.add_argument('--jpeg-size', type=int, nargs=2, default=None, metavar=('W', 'H'),
                        help='size of the generated JPEG files when no --data-dir is given (default: 500 375, an '
                             'ImageNet-like photo, for images of 128 px and more; image size / 0.875 below)')
    parser.add_argument('--jpeg-dir', default='', metavar='DIR',
                        help='where to write (and reuse) the generated JPEG files (default: a temporary folder)')
    parser.add_argument('--trainer-steps', type=int, default=None, metavar='N',
                        help="updates of train_kd.py's loop to time (default: max(--steps, 3 x the loader's "
                             "prefetch depth)); 0 skips the trainer row")
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
    if args.model_ema:  # as train_kd.py: the trainer row updates it after every step
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)

    if args.lr is None:
        args.lr = args.lr_base * args.batch_size / args.lr_base_size
    opt_kwargs = dict(optimizer_kwargs(cfg=args), **args.opt_kwargs)
    optimizer = create_optimizer_v2(task.get_trainable_module(), **opt_kwargs)
    student_optimizer = create_optimizer_v2(student, **opt_kwargs)

    # loader: JPEG files (--data-dir, or generated: enough for the data row and the trainer row)
    depth = prefetch_depth(args.workers)
    trainer_steps = max(bench.steps, 3 * depth) if bench.trainer_steps is None else bench.trainer_steps
    jpeg_dir = None
    if dataset is None:
        side = int(math.ceil(max(img_size) / 0.875))
        size = tuple(bench.jpeg_size) if bench.jpeg_size else (500, 375) if max(img_size) >= 128 else (side, side)
        count = args.batch_size * (max(4 * depth, trainer_steps) + 1)
        if not bench.jpeg_dir:  # a temporary folder goes when the benchmark ends
            bench.jpeg_dir = tempfile.mkdtemp(prefix='scalekd_bench_jpeg_')
            atexit.register(shutil.rmtree, bench.jpeg_dir, ignore_errors=True)
        jpeg_dir = write_jpeg_folder(bench.jpeg_dir, count, size, num_classes, seed=args.seed)
        dataset = create_dataset('', root=jpeg_dir, split='train', is_training=True)
    loader = train_kd.create_train_loader(dataset, args, data_config, device, persistent_workers=args.workers > 0)
    if len(loader) < 1:
        raise SystemExit(f'the data holds fewer images ({len(dataset)}) than one batch ({args.batch_size}); '
                         f'lower --batch-size')
    return dict(device=device, task=task, student=student, optimizer=optimizer, depth=depth,
                trainer_steps=trainer_steps, jpeg_dir=jpeg_dir, student_optimizer=student_optimizer, loader=loader,
                img_size=img_size, num_classes=num_classes)


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

    def task_fwd():
        with amp():
            task(x, y)

    def scalekd_step():
        optimizer.zero_grad(set_to_none=True)
        with amp():
            out = task(x, y)
        out['loss'].backward()
        optimizer.step()

    def student_step():
        student_optimizer.zero_grad(set_to_none=True)
        with amp():
            loss = task.criterion(student(x), y)
        loss.backward()
        student_optimizer.step()

    def reference_step():  # the released algorithm at the step's precision (same autocast, same teacher weights)
        optimizer.zero_grad(set_to_none=True)
        with amp():
            out = reference_forward(task, x, y)
        out['loss'].backward()
        optimizer.step()

    return dict(teacher_fwd=teacher_fwd, student_fb=student_fb, heads_fb=heads_fb, optimizer=optimizer_step,
                task_fwd=task_fwd, scalekd_step=scalekd_step, student_step=student_step, reference_step=reference_step)


def check_reference(task, x, y):
    """Largest relative difference of the loss terms, optimised step vs reference (fp32, no grad)."""
    with torch.no_grad():
        a = task(x.float(), y)
        b = reference_forward(task, x, y)
    return max(abs(float(a[k]) - float(b[k])) / max(abs(float(b[k])), 1e-12) for k in b if k.startswith('loss'))


def time_loader(batches: 'LoaderCycle', depth: int, timer: 'Timer') -> int:
    """The loader alone, back to back: ``depth`` batches drain what it prepared ahead, then 3 x ``depth`` batches
    are timed one by one, so the row is what the workers sustain, not a queue being emptied. Returns that count."""
    for _ in range(depth):
        batches.next()
    for _ in range(3 * depth):
        timer.run('data', batches.next)
    return 3 * depth


def run_trainer(ctx, args, amp, steps: int):
    """``steps`` updates of train_kd.py's own loop (train_one_epoch: loader, prefetcher, autocast, task forward,
    backward, one gradient norm for the non-finite check and --clip-grad, optimizer, EMA, LR schedule, the
    console line) over the run's loader, back to back. Returns its StepTimer's img/s and data-wait share."""
    targs = argparse.Namespace(**vars(args))
    targs.prefetcher, targs.distributed, targs.rank, targs.world_size = not args.no_prefetcher, False, 0, 1
    targs.log_interval, targs.recovery_interval, targs.grad_accum_steps = 10 ** 9, 0, max(1, args.grad_accum_steps)
    loader = FirstBatches(ctx['loader'], steps)
    timer = StepTimer(0, len(loader), 1)
    student = StudentRun(targs, '', '')  # train_kd.py's loop takes a list of students: a solo run is a list of one
    student.task, student.optimizer = ctx['task'], ctx['optimizer']
    student.guard = NonFiniteGuard(args.nonfinite, args.nonfinite_max_skips, device=ctx['device'])
    metrics, = train_kd.train_one_epoch(0, [student], loader, targs, ctx['device'], amp, None, timer, EpochPosition())
    _sync(ctx['device'])
    return dict(img_per_s=metrics['img_per_s'], updates=len(loader), ms=1e3 * timer.update.avg,
                data_wait=timer.data.avg / max(timer.update.avg, 1e-9))


def run_benchmark(bench, args):
    if bench.threads:
        torch.set_num_threads(bench.threads)
    heap_cache = False
    if torch.device(args.device).type == 'cpu' and not bench.no_heap_cache:
        heap_cache = keep_heap_memory()
    check_precision(args.amp, 'bfloat16', torch.device(args.device))
    check_compile(args.torchcompile, args.torchcompile_mode, torch.device(args.device))
    ctx = build(args, bench)
    device, task = ctx['device'], ctx['task']
    amp = partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16) if args.amp else nullcontext
    compiled = bool(args.torchcompile)
    timer = Timer(device)
    batches = LoaderCycle(ctx['loader'], device, args.channels_last)

    # 1) data loading alone (the loader's own throughput, nothing else running)
    data_batches = time_loader(batches, ctx['depth'], timer)
    x, y = batches.next()
    ref_diff = check_reference(task, x, y)

    # 2) FLOPs, one untimed eager call each (the same work compiled or not)
    parts = make_parts(ctx, x, y, amp)
    order = ['teacher_fwd', 'optimizer', 'task_fwd', 'scalekd_step']
    if not compiled:
        order[1:1] = ['student_fb', 'heads_fb', 'student_step']
    if not bench.no_reference:
        order.append('reference_step')
    flops = {name: count_flops(parts[name]) for name in order}

    # 3) the run's fast path, as train_kd.py sets it up: teacher held in bf16, then compile
    if args.amp:
        task.hold_teacher(torch.bfloat16)
    if compiled:
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)

    # 4) the compute parts, round-robin on one fixed batch
    for i in range(bench.warmup + bench.steps):
        for name in order:
            timer.run(name, parts[name], record=i >= bench.warmup)

    # 5) train_kd.py's own loop over the loader, back to back
    trainer = None
    if ctx['trainer_steps']:
        _reset_peak(device)
        trainer = run_trainer(ctx, args, amp, ctx['trainer_steps'])
        timer.peak['trainer_step'] = _peak_mem_mb(device)
        timer.times['trainer_step'] = [trainer['ms'] / 1e3]
        flops['trainer_step'] = flops['scalekd_step']
    flops['data'] = 0

    B = x.shape[0]
    ms = {name: timer.median_ms(name) for name in timer.times}
    fastest = {name: timer.min_ms(name) for name in timer.times}
    if not compiled:
        ms['sum_of_parts'] = sum(ms[p] for p in STEP_PARTS)
        fastest['sum_of_parts'] = sum(fastest[p] for p in STEP_PARTS)
        flops['sum_of_parts'] = sum(flops[p] for p in STEP_PARTS)
    step_ms = ms['scalekd_step']
    peak_name, peak_tflops = dense_bf16_peak(_device_name(device)) if device.type == 'cuda' else (None, None)
    rows = {}
    for name in ['data', *STEP_PARTS, 'sum_of_parts', 'task_fwd', 'scalekd_step', 'student_step', 'reference_step',
                 'trainer_step']:
        if name not in ms:
            continue
        gflop = flops[name] / 1e9
        rows[name] = dict(
            description=DESCRIPTIONS[name], ms=ms[name], min_ms=fastest[name], share=ms[name] / step_ms, gflop=gflop,
            gflops_per_s=gflop / (ms[name] / 1e3) if gflop else None,
            img_per_s=B / (ms[name] / 1e3),
            peak_mem_mb=timer.peak.get(name, max(timer.peak.values())),
        )
        if peak_tflops and gflop:
            rows[name]['fraction_of_bf16_peak'] = rows[name]['gflops_per_s'] / 1e3 / peak_tflops
    result = dict(
        model=args.model, teacher=args.teacher, config=args.config or None, img_size=list(ctx['img_size']),
        num_classes=ctx['num_classes'], batch_size=B, device=str(device), device_name=_device_name(device),
        amp='bfloat16' if args.amp else None, channels_last=bool(args.channels_last),
        compile=args.torchcompile or None, compile_mode=args.torchcompile_mode if compiled else None,
        mode='eager' if not compiled else 'compiled' + (f' ({args.torchcompile_mode})' if args.torchcompile_mode
                                                          else ''),
        steps=bench.steps, warmup=bench.warmup, threads=torch.get_num_threads(), workers=args.workers,
        optimizer=args.opt,
        data=('ImageFolder ' + args.data_dir) if args.data_dir else f"generated JPEG files in {ctx['jpeg_dir']}",
        augmentation=dict(aa=args.aa, reprob=args.reprob, interpolation=args.train_interpolation),
        prefetch_depth=ctx['depth'], data_timed_batches=data_batches,
        peak_memory_kind='torch.cuda.max_memory_allocated during the part' if device.type == 'cuda'
        else 'process ru_maxrss high-water mark (cumulative)',
        device_bf16_peak_tflops=peak_tflops, device_bf16_peak_entry=peak_name,
        cpu_heap_cache=heap_cache, reference_dtype='bfloat16 autocast' if args.amp else 'float32',
        reference_max_rel_loss_diff=ref_diff, parts=rows,
    )
    if not compiled:
        result.update(sum_of_parts_ms=ms['sum_of_parts'], ratio_step_to_sum_of_parts=step_ms / ms['sum_of_parts'],
                      ratio_step_to_student_step=step_ms / ms['student_step'])
    # the same ratios from the fastest round of each part (less sensitive to other load on the machine)
    result['ratios_from_min'] = {}
    if not compiled:
        result['ratios_from_min'].update(
            ratio_step_to_sum_of_parts=fastest['scalekd_step'] / fastest['sum_of_parts'],
            ratio_step_to_student_step=fastest['scalekd_step'] / fastest['student_step'])
    if not bench.no_reference:
        # the reference runs at the step's precision: this is the same-precision speed-up
        result['speedup_vs_reference_same_precision'] = ms['reference_step'] / step_ms
        result['speedup_vs_reference'] = result['speedup_vs_reference_same_precision']
        result['ratios_from_min']['speedup_vs_reference_same_precision'] = \
            fastest['reference_step'] / fastest['scalekd_step']
    if trainer is not None:
        result.update(trainer_step_img_per_s=trainer['img_per_s'], trainer_updates=trainer['updates'],
                      trainer_data_wait=trainer['data_wait'],
                      ratio_trainer_to_full_step_img_per_s=trainer['img_per_s'] / rows['scalekd_step']['img_per_s'])
    step_row = rows['scalekd_step']
    result['full_step'] = dict(img_per_s=step_row['img_per_s'], tflops_per_s=step_row['gflops_per_s'] / 1e3,
                               peak_mem_gib=step_row['peak_mem_mb'] / 1024,
                               fraction_of_bf16_peak=step_row.get('fraction_of_bf16_peak'))
    result['targets'] = dict(
        step_le_1_10x_sum_of_parts=result['ratio_step_to_sum_of_parts'] <= 1.10 if not compiled else None,
        speedup_vs_reference_ge_1_5x=result.get('speedup_vs_reference_same_precision', 0.) >= 1.5,
        trainer_within_5pct_of_full_step=abs(result['ratio_trainer_to_full_step_img_per_s'] - 1) <= 0.05
        if trainer is not None else None)
    return result


def _device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    import platform
    return platform.processor() or platform.machine()


def format_table(r):
    mem_head = 'peak MB' if r['device'].startswith('cuda') else 'maxRSS MB'
    lines = [f"ScaleKD step breakdown: {r['teacher']} -> {r['model']} @ {r['img_size'][0]}x{r['img_size'][1]}, "
             f"batch {r['batch_size']}, {r['device']} ({r['device_name']}), {r['mode']}, "
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
    if 'ratio_step_to_sum_of_parts' in r:
        lines.append(f"full step / sum of parts     : {r['ratio_step_to_sum_of_parts']:.3f}  (target <= 1.10: "
                     f"{'met' if r['targets']['step_le_1_10x_sum_of_parts'] else 'NOT met'})")
        lines.append(f"full step / plain student    : {r['ratio_step_to_student_step']:.3f}")
    if 'speedup_vs_reference_same_precision' in r:
        lines.append(f"speed-up vs reference step   : {r['speedup_vs_reference_same_precision']:.3f}x at the same "
                     f"precision ({r['reference_dtype']}; target >= 1.5: "
                     f"{'met' if r['targets']['speedup_vs_reference_ge_1_5x'] else 'NOT met'})")
    if 'trainer_step_img_per_s' in r:
        lines.append(f"train_kd.py loop (console)   : {r['trainer_step_img_per_s']:.1f} img/s over "
                     f"{r['trainer_updates']} updates, data wait {100 * r['trainer_data_wait']:.0f}%, "
                     f"{r['ratio_trainer_to_full_step_img_per_s']:.3f}x the full step (target within 5%: "
                     f"{'met' if r['targets']['trainer_within_5pct_of_full_step'] else 'NOT met'})")
    lines.append(f"data row                     : {r['data_timed_batches']} batches timed back to back after "
                 f"draining the prefetch depth of {r['prefetch_depth']}; {r['data']}")
    if r['device_bf16_peak_tflops']:
        fs = r['full_step']
        lines.append(f"full step vs device          : {fs['tflops_per_s']:.1f} TFLOP/s = "
                     f"{100 * fs['fraction_of_bf16_peak']:.1f}% of the dense bf16 peak "
                     f"{r['device_bf16_peak_tflops']:g} "
                     f"TFLOP/s ({r['device_bf16_peak_entry']})")
    if r['ratios_from_min']:
        lines.append('from the fastest round       : ' + ', '.join(
            f'{k} {v:.3f}' for k, v in r['ratios_from_min'].items()))
    lines.append(f"reference vs optimised losses: max relative difference "
                 f"{r['reference_max_rel_loss_diff']:.2e} (fp32)")
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
