"""The paper recipes (recipes/*.yaml): they load, name real timm models, and build a ScaleKD task that runs.

For every paper pair the student, the teacher (random weights, at the recipe's teacher size) and the
ScaleKD task are built exactly as train_kd.py builds them (same parser, same ``task_kwargs`` and
``criterion_kwargs``) at 224 px, then one forward and backward at batch 1 is checked: shapes, finite
loss terms inside their mathematical range, the stage-3 projector landing on the teacher's own stage-3
grid, and gradients reaching the student through the frozen teacher tail. Teachers are big (Swin-L
197 M, EVA-L 304 M params), so each one is created once and the recipes run grouped by teacher; the
whole file takes about 4 CPU-minutes (2 threads), ``-m "not slow"`` one pair per teacher.
"""
import glob
import os
import re

import pytest
import torch

import timm
from timm.data import resolve_data_config
from timm.models import split_model_name_tag

import models  # noqa: F401  registers the paper's students
import train_kd
from config import load_recipe
from distillers import build_task
from distillers.flags import check_distill_args, criterion_kwargs, loss_weights, task_kwargs

torch.set_num_threads(2)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE_DIR = os.path.join(ROOT, 'recipes')

# file -> (teacher, student, expected (s3, s4) student taps); grouped by teacher so each is built once
PAPER = {
    'swinl_mbv1': ('swin_large', 'mobilenetv1_100', (3, 'final')),
    'swinl_r50': ('swin_large', 'resnet50d', (3, 'final')),
    'swinl_convnextt': ('swin_large', 'convnext_tiny_normfirst', (2, 'final')),
    'swinl_mixers16': ('swin_large', 'mixer_s16_224', (5, 7)),
    'swinl_mixerb16': ('swin_large', 'mixer_b16_224', (9, 11)),
    'swinl_vits': ('swin_large', 'vit_small_patch16_224_gap', (8, 'final')),
    'swinl_swint': ('swin_large', 'swin_tiny_patch4_window7_224', (2, 'final')),
    'swinl_vitb': ('swin_large', 'vit_base_patch16_224_gap', (8, 'final')),
    'swinl_r50_trad': ('swin_large', 'resnet50', (3, 'final')),
    'swinl_mbv1_trad': ('swin_large', 'mobilenetv1_100', (3, 'final')),
    'swinb_r50_trad': ('swin_base', 'resnet50', (3, 'final')),
    'swins_r50_trad': ('swin_small', 'resnet50', (3, 'final')),
    'eval_r50': ('eva_large', 'resnet50d', (3, 'final')),
    'eval_mixerb14': ('eva_large', 'mixer_b14_224', (9, 11)),
    'eval_vitb14': ('eva_large', 'vit_base_patch14_224_gap', (8, 'final')),
}
# one cheap pair per teacher runs by default under `-m "not slow"`; the full set is the default `pytest` run
FAST = ('swinl_vits', 'swinb_r50_trad', 'swins_r50_trad', 'eval_vitb14')
# trainable parameters of one stage-3 / stage-4 projector, in millions, as the official code builds them
CAP_PARAMS_M = {'swinl_r50': (17.9, 70.1), 'swinl_vitb': (13.3, 33.8)}


def _path(name):
    return os.path.join(RECIPE_DIR, name + '.yaml')


def _args(path):
    """The Namespace train_kd.py would run with: parser defaults + the recipe (no command-line flags)."""
    parser = train_kd.build_parser()
    parser.set_defaults(**load_recipe(path, parser))
    return parser.parse_args([])


def test_every_paper_pair_has_a_recipe():
    names = {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(RECIPE_DIR, '*.yaml'))}
    missing = sorted(set(PAPER) - names)
    assert not missing, f'missing recipes: {missing}'


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(RECIPE_DIR, '*.yaml'))),
                         ids=lambda p: os.path.basename(p)[:-5])
def test_recipe_loads_and_names_timm_models(path):
    args = _args(path)
    assert timm.is_model(args.model), f'{path}: student {args.model} is not a registered timm model'
    if args.distiller != 'none':
        arch, tag = split_model_name_tag(args.teacher)
        assert timm.is_model(arch), f'{path}: teacher {args.teacher} is not a registered timm model'
        if tag:  # a hub tag must exist, since train_kd.py downloads it when no --teacher-checkpoint is given
            assert args.teacher in timm.list_pretrained(arch + '*'), f'{path}: no pretrained tag {args.teacher}'


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(RECIPE_DIR, '*.yaml'))),
                         ids=lambda p: os.path.basename(p)[:-5])
def test_recipe_passes_the_distillation_checks_and_runs_without_its_teacher(path, capsys):
    """No recipe sets a weight its distiller does not use (a recipe key counts as set); the no-teacher baseline
    runs on every recipe but the one whose ScaleKD setting is kd_weight 0."""
    parser = train_kd.build_parser()
    parser.set_defaults(**load_recipe(path, parser))
    check_distill_args(parser.error, parser.parse_args([]))
    baseline = parser.parse_args(['--distiller', 'none', '--teacher', ''])
    if os.path.basename(path) == 'swins_r50_trad.yaml':
        with pytest.raises(SystemExit):
            check_distill_args(parser.error, baseline)
        assert "'kd_weight') is not used by --distiller none" in capsys.readouterr().err
    else:
        check_distill_args(parser.error, baseline)


@pytest.mark.parametrize('name', list(PAPER))
def test_paper_recipe_settings(name):
    path = _path(name)
    args = _args(path)
    teacher, student, _ = PAPER[name]
    assert args.model == student and args.teacher.startswith(teacher)
    assert args.distiller == 'scalekd' and args.teacher_mode == 'eval'
    # hard labels only: the official distillation runs never used Mixup/CutMix
    assert args.mixup == 0 and args.cutmix == 0 and args.cutmix_minmax is None
    assert args.lr is not None, 'the paper lr is absolute: the recipe must set lr, not lr_base'
    assert args.mean == [0.485, 0.456, 0.406] and args.std == [0.229, 0.224, 0.225]
    text = open(path).read()
    header = text.split('\n\n', 1)[0]
    assert f'./distributed_train.sh 8 --config recipes/{name}.yaml --data-dir /data/imagenet' in header
    assert re.search(r'NNODES=4 NODE_RANK=<0\.\.3> MASTER_ADDR=<host> MASTER_PORT=29500', header)
    m = re.search(r'global batch of (\d+)', header)
    assert m, 'the header must state the global batch the lr was tuned for'
    world = 32 if '4 nodes x 8 GPUs, the official node count' in header else 8
    assert args.batch_size * world == int(m.group(1)), 'batch_size x official processes != stated global batch'
    if not name.endswith('_trad'):
        assert re.search(r'baseline \d+\.\d+, ScaleKD \d+\.\d+', header), 'paper top-1 missing from the header'


class _TeacherCache:
    """One big teacher alive at a time (random weights; never downloaded), with its measured level shapes."""

    def __init__(self):
        self.key = None
        self.teacher = None
        self.shapes = {}

    def get(self, args):
        key = (args.teacher, args.teacher_img_size, tuple(sorted(args.teacher_kwargs.items())))
        if key != self.key:
            self.teacher, self.shapes = None, {}
            kw = dict(args.teacher_kwargs)
            if args.teacher_img_size:
                kw['img_size'] = args.teacher_img_size
            with torch.no_grad():
                teacher = timm.create_model(args.teacher, pretrained=False, num_classes=1000, **kw)
            teacher.requires_grad_(False).eval()
            self.key, self.teacher = key, teacher
        return self.teacher

    def level_shape(self, level, img_size):
        """(C, H, W) of the teacher's own feature level ``level`` at ``img_size``, from a real forward."""
        if (level, img_size) not in self.shapes:
            with torch.no_grad():
                inter = self.teacher.forward_intermediates(
                    torch.zeros(1, 3, *img_size), indices=[level], output_fmt='NCHW', intermediates_only=True)
            self.shapes[level, img_size] = tuple(inter[0].shape[1:])
        return self.shapes[level, img_size]


_TEACHERS = _TeacherCache()


@pytest.mark.parametrize('name', [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in PAPER])
def test_paper_recipe_builds_and_steps(name):
    args = _args(_path(name))
    torch.manual_seed(0)
    student = timm.create_model(args.model, num_classes=1000, drop_path_rate=args.drop_path, **args.model_kwargs)
    data_config = resolve_data_config(vars(args), model=student)
    img_size = tuple(data_config['input_size'][-2:])
    assert img_size == (224, 224)
    teacher = _TEACHERS.get(args)
    task = build_task(
        'scalekd', student, teacher, criterion_kwargs=criterion_kwargs(args), device=torch.device('cpu'),
        **task_kwargs(args, img_size), mean=data_config['mean'], std=data_config['std'])
    task.train()
    module = task.trainable_module
    tail = task.tail

    # taps: the paper's (as the official code takes them), including the ones a recipe sets explicitly
    assert (module.taps.s3, module.taps.s4) == PAPER[name][2]

    # stage-3 projectors aim at the teacher's real stage-3 output, stage-4 ones at its final grid
    t3 = _TEACHERS.level_shape(tail.start - 1, img_size)
    assert (tail.in_chs, *tail.in_grid) == t3
    for key, cap in module.caps.items():
        if key.startswith('s3'):
            assert (cap.out_chs, *cap.query_grid) == t3
        else:
            assert (cap.out_chs, *cap.query_grid) == (tail.out_chs, *tail.out_grid)
    if name.startswith('eval'):
        # EVA-L at 224: 16x16 tokens, tail = last 2 blocks, no final norm (fc-norm model): T4 is the raw patch map
        assert tail.kind == 'vit' and tail.num_blocks == 2 and t3 == (1024, 16, 16)
        assert isinstance(teacher.norm, torch.nn.Identity)
    expect_caps = {f'{stage}_{v}' for i, v in enumerate('ab') for stage in ('s3', 's4')
                   if (stage == 's3' and (args.scalekd_alpha_s3[i] or args.scalekd_alpha_s4[i]))
                   or (stage == 's4' and args.scalekd_alpha_s4[i])}
    assert set(module.caps) == expect_caps
    if name in CAP_PARAMS_M:
        n3, n4 = (sum(p.numel() for p in module.caps[k].parameters()) / 1e6 for k in ('s3_a', 's4_a'))
        assert (round(n3, 1), round(n4, 1)) == CAP_PARAMS_M[name]

    # the teacher gets its own normalisation (CLIP mean/std for EVA), the student's batch otherwise unchanged
    x = torch.randn(1, 3, *img_size)
    renormalised = not torch.allclose(task.teacher_input(x), x)
    assert renormalised == name.startswith('eval')

    seen = {}
    s3_cap = module.caps['s3_a']
    hooks = [s3_cap.register_forward_hook(lambda m, i, o: seen.__setitem__('p3', o)),
             module.register_forward_hook(lambda m, i, o: seen.__setitem__('maps', o[1]))]
    out = task(x, torch.tensor([7]))
    for h in hooks:
        h.remove()

    assert out['output'].shape == (1, 1000)
    # CAP-3 output = tokens on the teacher's stage-3 grid, the teacher tail's input
    assert seen['p3'].shape == (1, t3[1] * t3[2], t3[0])
    t4_shape = (1, tail.out_chs, *tail.out_grid)
    for k, v in seen['maps'].items():
        assert v.shape == t4_shape, k
    n_pos = tail.out_grid[0] * tail.out_grid[1]
    for k in task.loss_weights:
        assert torch.isfinite(out[k]).all(), f'{name}: {k} = {out[k]}'
        if k.startswith('loss_s'):
            # sum over positions of |n(P) - n(T)|^2, each in [0, 4], divided by the batch
            assert 0 <= out[k].item() <= 4 * n_pos + 1e-3, f'{name}: {k} = {out[k].item()}'
    expect_terms = {'loss_cls', 'loss_kd'} | {
        f'loss_{s}{suffix}' for s, a in (('s3', args.scalekd_alpha_s3), ('s4', args.scalekd_alpha_s4))
        for i, suffix in enumerate(('', '_alt')) if a[i]}
    assert set(task.loss_weights) == expect_terms
    assert (task.loss_weights['loss_cls'], task.loss_weights['loss_kd']) == pytest.approx(loss_weights(args))
    assert task.loss_weights['loss_kd'] == (0.0 if name == 'swins_r50_trad' else 0.5)  # the recipe's, or the default
    assert torch.isfinite(out['loss'])

    out['loss'].backward()
    # TPP: the stage-3 learned queries only reach the loss through the frozen teacher tail
    assert s3_cap.query.weight.grad is not None and s3_cap.query.weight.grad.abs().sum() > 0
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in teacher.parameters())
