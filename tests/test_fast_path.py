"""The fast path: recipes in bf16 + channels_last, --torchcompile compiling what the step runs, one gradient norm
per update, the once-per-step learned-query path, and the checks that stop a run before step 0."""
import copy
import glob
import os

import pytest
import timm
import torch
import torch.nn.functional as F

import models  # noqa: F401  registers the demo models
import train_kd
from config import parse_args_with_recipe
from distillers import build_task
from distillers.cap import CrossAttentionProjector
from distillers.scalekd import ScaleKDTask
from runtime.device import check_compile, check_precision, fused_optimizer_kwargs
from runtime.errors import FatalError
from runtime.nonfinite import NonFiniteGuard, norm_and_clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_RECIPES = sorted(p for p in glob.glob(os.path.join(ROOT, 'recipes', '*.yaml'))
                       if not os.path.basename(p).startswith('demo_'))


def _task(seed=0, depth=4):
    torch.manual_seed(seed)
    student = timm.create_model('scalekd_demo_resnet', num_classes=10)
    teacher = timm.create_model('scalekd_demo_vit', num_classes=10, depth=depth)
    task = build_task('scalekd', student, teacher, img_size=(32, 32), verbose=False)
    return task.train()


def _batch(n=4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _step(task, x, y):
    out = task(x, y)
    out['loss'].backward()
    module = task.trainable_module
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items() if k.startswith('loss')}, grads


def _same_step(a, b, rtol, atol_scale):
    (la, ga), (lb, gb) = a, b
    assert la.keys() == lb.keys() and len(la) == 7
    for k in la:
        torch.testing.assert_close(lb[k], la[k], rtol=rtol, atol=rtol, msg=f'{k} differs')
    strip = lambda g: {n.replace('_orig_mod.', ''): v for n, v in g.items()}
    ga, gb = strip(ga), strip(gb)
    assert ga.keys() == gb.keys() and len(ga) > 100
    scale = max(v.abs().max().item() for v in ga.values())
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=rtol, atol=atol_scale * scale, msg=f'grad of {n} differs')


# --- --torchcompile compiles what runs ----------------------------------------------------------
def test_compile_runs_teacher_tail_student_and_projectors_through_graphs(one_thread):
    """Every parameter of the teacher (not only its tail), the student and the projectors is an input of a
    graph the backend compiled, and the compiled step computes what the eager one does."""
    eager, task = _task(), _task()
    graphs = []

    def recording_backend(gm, example_inputs):  # runs the captured graph as it is (exact)
        graphs.append({t.data_ptr() for t in example_inputs if isinstance(t, torch.Tensor)})
        return gm.forward

    task.compile(backend=recording_backend)
    x, y = _batch()
    compiled = _step(task, x, y)
    assert len(graphs) == 2, f'teacher forward + trainable module: one graph each (no graph break), got {len(graphs)}'
    seen = set().union(*graphs)
    module = task.trainable_module._orig_mod
    for name, mod in (('teacher', task.teacher.model), ('teacher tail', task.tail.teacher.blocks[task.tail.start:]),
                      ('student', module.student), ('projectors', module.caps)):
        params = list(mod.parameters())
        missing = [n for n, p in mod.named_parameters() if p.data_ptr() not in seen]
        assert params and not missing, f'{name}: {len(missing)} of {len(params)} parameters ran eagerly: {missing[:3]}'
    # the teacher graph is the one that holds the teacher's patch embedding (outside the tail)
    assert sum(task.teacher.model.patch_embed.proj.weight.data_ptr() in g for g in graphs) == 1
    _same_step(_step(eager, x, y), compiled, rtol=1e-6, atol_scale=1e-6)


@pytest.mark.slow
def test_inductor_compiled_step_matches_eager(one_thread):
    """inductor on CPU (needs a C compiler; about 2-3 minutes on 2 busy cores, most of it C++ compilation): the
    teacher forward and the trainable module compile to one graph each, and the first step's losses and gradients
    equal eager within 1e-5."""
    from torch._dynamo.utils import counters
    eager, task = _task(depth=2), _task(depth=2)
    task.compile(backend='inductor')
    x, y = _batch()
    counters.clear()
    with torch.no_grad():
        t_logits, t4 = task.teacher_targets(x)
    assert counters['stats']['unique_graphs'] == 1, 'the teacher forward did not run compiled'
    e_logits, e_t4 = eager.teacher_targets(x)
    torch.testing.assert_close(t_logits, e_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t4, e_t4, rtol=1e-5, atol=1e-5)
    compiled = _step(task, x, y)
    assert counters['stats']['unique_graphs'] == 2 and not counters['graph_break']
    _same_step(_step(eager, x, y), compiled, rtol=1e-5, atol_scale=1e-5)


def test_compile_probe_stops_a_machine_without_a_working_compiler():
    check_compile(None, None, torch.device('cpu'))  # no --torchcompile: nothing to check

    def broken_backend(gm, example_inputs):
        raise RuntimeError('no C compiler found')

    with pytest.raises(FatalError, match=r'--torchcompile .* does not work on this machine .*no C compiler found'):
        check_compile(broken_backend, None, torch.device('cpu'))
    with pytest.raises(FatalError, match='--torchcompile nosuchbackend does not work'):
        check_compile('nosuchbackend', None, torch.device('cpu'))
    check_compile('aot_eager', None, torch.device('cpu'))


def test_train_kd_stops_before_step_0_when_compile_fails(tmp_path, image_folder, caplog):
    argv = ['--data-dir', image_folder, '--model', 'scalekd_demo_resnet', '--distiller', 'none', '-b', '4',
            '--epochs', '1', '-j', '0', '--output', str(tmp_path / 'out'), '--experiment', 'x',
            '--torchcompile', 'nosuchbackend']
    assert train_kd.main(argv) == 2
    assert '--torchcompile nosuchbackend does not work on this machine' in caplog.text
    assert not (tmp_path / 'out').exists()


# --- bf16 + channels_last ----------------------------------------------------------------------
@pytest.mark.parametrize('path', PAPER_RECIPES, ids=lambda p: os.path.basename(p)[:-5])
def test_paper_recipe_resolves_to_bf16_channels_last_and_fp32_override_works(path):
    args, _ = parse_args_with_recipe(train_kd.build_parser(), ['--config', path])
    assert args.amp is True and args.amp_dtype == 'bfloat16' and args.channels_last is True
    args, _ = parse_args_with_recipe(train_kd.build_parser(), ['--config', path, '--no-amp', '--no-channels-last'])
    assert args.amp is False and args.channels_last is False


def test_demo_recipes_stay_fp32_and_timm_style_amp_flag_still_works():
    for name in ('demo_fmnist', 'demo_fmnist_teacher'):
        path = os.path.join(ROOT, 'recipes', name + '.yaml')
        args, _ = parse_args_with_recipe(train_kd.build_parser(), ['--config', path])
        assert args.amp is False and args.channels_last is False
        args, _ = parse_args_with_recipe(train_kd.build_parser(), ['--config', path, '--amp', '--channels-last'])
        assert args.amp is True and args.channels_last is True and args.amp_dtype == 'float16'


def test_bf16_on_a_gpu_without_bf16_stops_naming_the_flag(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda *a, **k: 'Tesla V100-SXM2-32GB')
    with pytest.raises(FatalError, match=r'--amp-dtype bfloat16 .* Tesla V100.*--amp-dtype float16 .*--no-amp'):
        check_precision(True, 'bfloat16', torch.device('cuda'))
    check_precision(True, 'float16', torch.device('cuda'))
    check_precision(False, 'bfloat16', torch.device('cuda'))
    check_precision(True, 'bfloat16', torch.device('cpu'))  # CPU autocast runs bf16


def test_bf16_run_holds_the_teacher_in_bf16_and_channels_last(tmp_path, image_folder, monkeypatch, teacher_ckpt, one_thread):
    seen = []
    forward = ScaleKDTask.forward

    def recording_forward(self, input, target):
        w = self.teacher.model.patch_embed.proj.weight
        out = forward(self, input, target)
        seen.append((w.dtype, w.is_contiguous(memory_format=torch.channels_last), input.is_contiguous(
            memory_format=torch.channels_last), torch.is_autocast_enabled('cpu'), float(out['loss'])))
        return out

    monkeypatch.setattr(ScaleKDTask, 'forward', recording_forward)
    argv = ['--data-dir', image_folder, '--model', 'scalekd_demo_resnet', '--distiller', 'scalekd',
            '--teacher', 'scalekd_demo_vit', '--teacher-checkpoint', teacher_ckpt, '-b', '4',
            '--epochs', '1', '-j', '0', '--lr', '0.01', '--output', str(tmp_path / 'out'), '--experiment', 'bf16',
            '--amp', '--amp-dtype', 'bfloat16', '--channels-last', '--clip-grad', '5', '--loss-balance-factor', '0']
    assert train_kd.main(argv) == 0
    assert seen and all(s[:4] == (torch.bfloat16, True, True, True) for s in seen), seen
    assert all(torch.isfinite(torch.tensor(s[4])) for s in seen)


# --- one gradient norm per update --------------------------------------------------------------
def _grads_model():
    torch.manual_seed(0)
    task = _task()
    x, y = _batch(6)
    task(x, y)['loss'].backward()
    return task.trainable_module


def _copy(module):
    """A deep copy with the gradients (deepcopy leaves .grad behind)."""
    other = copy.deepcopy(module)
    for a, b in zip(module.parameters(), other.parameters()):
        b.grad = None if a.grad is None else a.grad.clone()
    return other


@pytest.mark.parametrize('max_norm', [5.0, 1e-3, None])
def test_single_gradient_norm_gives_the_same_clipped_update_bitwise(max_norm):
    before = _grads_model()
    after = _copy(before)
    # the previous path: per-tensor norms for the non-finite flag, then timm's clip (its own norm), then the step
    params = list(before.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    flag = torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
    clip_total = None
    if max_norm is not None:
        clip_total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    torch.optim.SGD(params, lr=0.1, momentum=0.9).step()
    # the new path: one norm, reused
    norm = norm_and_clip(after.parameters(), max_norm, 'norm', list(after.parameters()))
    torch.optim.SGD(after.parameters(), lr=0.1, momentum=0.9).step()
    assert bool(flag) and torch.isfinite(norm)
    if clip_total is not None:
        assert torch.equal(norm, clip_total)
        if max_norm < 1:
            assert norm > max_norm  # the clip was active
    for (n, a), b in zip(before.named_parameters(), after.parameters()):
        assert torch.equal(a, b), f'{n} differs'


def test_gradient_norm_feeds_the_nonfinite_guard():
    module = _grads_model()
    p = next(module.parameters())
    p.grad[0].view(-1)[0] = float('inf')
    norm = norm_and_clip(module.parameters(), 5.0, 'norm')
    guard = NonFiniteGuard('skip', max_skips=3)
    assert guard.skip_update({'loss': torch.tensor(1.0), 'gradient': norm}, step=1)
    assert guard.skipped == 1
    assert norm_and_clip([torch.nn.Parameter(torch.ones(2))], 5.0) is None  # no gradients: nothing to check


def test_value_and_agc_modes_still_clip_with_timm():
    a = _grads_model()
    b = _copy(a)
    norm = norm_and_clip(a.parameters(), 1e-4, 'value', list(a.parameters()))
    timm.utils.dispatch_clip_grad(list(b.parameters()), value=1e-4, mode='value')
    assert torch.isfinite(norm)
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x.grad, y.grad)
    assert max(p.grad.abs().max() for p in a.parameters()) <= 1e-4


def test_fused_adamw_on_cuda_only():
    cuda, cpu = torch.device('cuda'), torch.device('cpu')
    assert fused_optimizer_kwargs('adamw', cuda, {}) == {'fused': True}
    assert fused_optimizer_kwargs('adam', cuda, {}) == {'fused': True}
    assert fused_optimizer_kwargs('adamw', cuda, {'foreach': True}) == {}
    assert fused_optimizer_kwargs('adamw', cpu, {}) == {}
    assert fused_optimizer_kwargs('lamb', cuda, {}) == {}
    assert fused_optimizer_kwargs('sgd', cuda, {}) == {}
    opt = timm.optim.create_optimizer_v2(torch.nn.Linear(2, 2), 'adamw', lr=1e-3, fused=True)
    assert opt.param_groups[0]['fused'] is True


# --- the learned-query path once per step ------------------------------------------------------
def _per_image_queries(cap, x):
    """CAP forward with the learned-query path expanded to the batch first (the form before the trim)."""
    B = x.shape[0]
    x = cap.stem(x) + cap.pos_embed
    kv = x.flatten(2).transpose(1, 2)
    queries = cap.query.weight.t().reshape(1, cap.out_chs, *cap.query_grid).expand(B, -1, -1, -1)
    q = cap.q(cap.query_proj(queries).flatten(2).transpose(1, 2)).unflatten(-1, (cap.num_heads, -1)).transpose(1, 2)
    k = cap.k(kv).unflatten(-1, (cap.num_heads, -1)).transpose(1, 2)
    v = cap.v(kv).unflatten(-1, (cap.num_heads, -1)).transpose(1, 2)
    o = cap.proj(F.scaled_dot_product_attention(q, k, v, scale=cap.scale).transpose(1, 2).flatten(2))
    y = cap.norm(o)
    return y + cap.mlp(y)


def test_learned_queries_once_per_step_are_exact(one_thread):
    """Bitwise on one thread; with several, the GEMM blocking differs between the 1-image and the B-image query
    product and the two forms agree to rounding only."""
    torch.manual_seed(0)
    cap = CrossAttentionProjector(32, 48, (4, 4), (3, 3), num_heads=4, softmax_scale=5.0)
    ref = copy.deepcopy(cap)
    x = torch.randn(5, 32, 4, 4)
    out, want = cap(x), _per_image_queries(ref, x)
    assert torch.equal(out, want)  # the forward is bit-identical
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g)
    for (n, a), b in zip(cap.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6 * b.grad.abs().max().item(), msg=n)


def test_ema_copy_shares_the_frozen_teacher():
    task = _task()
    task.setup_ema(decay=0.9)
    ema = task.get_trainable_module(ema=True).module
    assert ema._tail.obj is task.tail and ema._tail.obj.teacher is task.teacher.model
    assert ema.caps['s3_a'].q.weight is not task.trainable_module.caps['s3_a'].q.weight


def test_compiled_run_trains_validates_and_saves_bare_keys(tmp_path, image_folder, teacher_ckpt, one_thread):
    """A whole train_kd.py run with --torchcompile (aot_eager: no C++ build) and an EMA: it trains, validates the
    compiled student and its EMA, and writes the student and projectors without compile or DDP prefixes."""
    import argparse
    argv = ['--data-dir', image_folder, '--model', 'scalekd_demo_resnet', '--distiller', 'scalekd',
            '--teacher', 'scalekd_demo_vit', '--teacher-checkpoint', teacher_ckpt, '-b', '4',
            '--epochs', '1', '-j', '0', '--lr', '0.01', '--output', str(tmp_path / 'out'), '--experiment', 'c',
            '--torchcompile', 'aot_eager', '--model-ema', '--clip-grad', '5', '--loss-balance-factor', '0']
    assert train_kd.main(argv) == 0
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(tmp_path / 'out' / 'c' / 'last.pth.tar', map_location='cpu', weights_only=True)
    keys = list(ckpt['state_dict']) + list(ckpt['state_dict_ema']) + list(ckpt['task_state']['caps'])
    assert keys and not [k for k in keys if '_orig_mod' in k or k.startswith('module.')]
    assert 'conv1.weight' in ckpt['state_dict'] and 's3_a.q.weight' in ckpt['task_state']['caps']
    # compiled or eager is no setting of the run: it resumes eager (e.g. on a machine without a compiler)
    eager = argv[:argv.index('--torchcompile')] + argv[argv.index('--torchcompile') + 2:]
    eager[eager.index('--epochs') + 1] = '2'
    assert train_kd.main(eager + ['--resume', str(tmp_path / 'out' / 'c' / 'last.pth.tar')]) == 0
    with torch.serialization.safe_globals([argparse.Namespace]):
        assert torch.load(tmp_path / 'out' / 'c' / 'last.pth.tar', map_location='cpu', weights_only=True)['epoch'] == 1


def test_run_started_before_the_fast_path_recipes_resumes_with_the_fp32_flags(tmp_path):
    """A run started with a recipe without amp/channels_last passes the resume settings check with the new recipe
    plus --no-amp --no-channels-last --amp-dtype float16, and is refused (naming them) without."""
    from runtime.resume import run_config
    path = os.path.join(ROOT, 'recipes', 'swinl_r50.yaml')
    old = tmp_path / 'swinl_r50.yaml'
    old.write_text(''.join(line for line in open(path) if not line.strip().startswith(
        ('amp:', 'amp_dtype:', 'channels_last:'))))

    def config(recipe, *flags):
        args, _ = parse_args_with_recipe(train_kd.build_parser(), ['--config', str(recipe), '--data-dir', 'd', *flags])
        return run_config(args, train_kd.RESUME_FREE_KEYS)

    saved = config(old)
    diff = lambda now: sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    assert diff(config(path)) == ['amp', 'amp_dtype', 'channels_last']
    assert diff(config(path, '--no-amp', '--no-channels-last', '--amp-dtype', 'float16')) == []
