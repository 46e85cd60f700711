"""Small images: a constant alternative view is safe, refused before step 0, and the loss balance is logged."""
import argparse
import json
import logging
import os

import pytest
import timm
import torch
import torch.nn.functional as F

import models  # noqa: F401
import train_kd
from distillers import build_task
from distillers.balance import term_gradient_norms, unbalanced_terms
from distillers.dfm import feature_distance, remove_dc

# a ViT-tiny teacher with 2x2 tokens at 32 px, as in the report of the bug
TINY_VIT = dict(img_size=32, patch_size=16, depth=2, class_token=False, global_pool='avg', fc_norm=False)


def _official_alt(p, t):
    """The alternative view with F.normalize, as the official code (and this project before the fix) computes it."""
    p, t = remove_dc(p.float()), remove_dc(t.float())
    return (F.normalize(p, dim=1) - F.normalize(t, dim=1)).pow(2).sum() / p.shape[0]


@pytest.mark.parametrize('grid', [(2, 2), (7, 7)])
def test_alternative_view_of_a_constant_map_is_finite_and_bounded(grid):
    """The exact gradient of the mean-removed view w.r.t. a spatially constant map is zero."""
    torch.manual_seed(0)
    B, C = 2, 64
    v = torch.randn(B, C, requires_grad=True)
    w = torch.randn(C, C) / C ** 0.5
    # the same computation at every position (as a projector attending over a single key)
    p = torch.stack([v @ w for _ in range(grid[0] * grid[1])], dim=-1).view(B, C, *grid)
    t = torch.randn(B, C, *grid)
    loss = feature_distance(p, t, alternative=True)
    g, = torch.autograd.grad(loss, v, retain_graph=True)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert g.norm() < 1e-3, g.norm()
    # the teacher side alone: each position contributes |n(T)|^2 = 1
    assert loss.item() == pytest.approx(grid[0] * grid[1], rel=1e-5)


@pytest.mark.parametrize('grid', [(7, 7), (14, 14), (4, 6), (2, 2)])
def test_alternative_view_unchanged_at_real_geometry(grid):
    """Non-degenerate maps: value and gradient bit-identical to F.normalize (paper geometry and the demo's 2x2)."""
    torch.manual_seed(1)
    p = torch.randn(3, 48, *grid, requires_grad=True)
    t = torch.randn(3, 48, *grid)
    new = feature_distance(p, t, alternative=True)
    g_new, = torch.autograd.grad(new, p)
    old = _official_alt(p, t)
    g_old, = torch.autograd.grad(old, p)
    assert torch.equal(new, old) and torch.equal(g_new, g_old)


def _resnet18_task(**kwargs):
    torch.manual_seed(0)
    student = timm.create_model('resnet18', num_classes=10)
    teacher = timm.create_model('vit_tiny_patch16_224', num_classes=10, **TINY_VIT)
    return build_task('scalekd', student, teacher, img_size=(32, 32), heads_s3=3, heads_s4=3, **kwargs)


def test_resnet18_at_32px_every_term_bounded():
    """resnet18 at 32 px has a 1x1 stage-4 map: every term's gradient into the student stays near the task loss's."""
    task = _resnet18_task()
    assert task.geometry['student_s4'] == (1, 1) and task.geometry['teacher_s4'] == (2, 2)
    assert set(task.constant_terms) == {'loss_s4_alt'}
    task.train()
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    norms = term_gradient_norms(task, x, y, task.get_eval_model().parameters())
    assert set(norms) == {'loss_cls', 'loss_kd', 'loss_s3', 'loss_s3_alt', 'loss_s4', 'loss_s4_alt'}
    for k, v in norms.items():
        assert v == v and v < 20 * norms['loss_cls'], (k, v, norms['loss_cls'])  # was ~3e6x before the fix
    assert norms['loss_s4_alt'] == 0.0  # constant by construction: the exact gradient is zero
    assert unbalanced_terms(norms, 20) == {}


def test_resnet18_at_32px_blows_up_with_the_official_normalisation():
    """The same setup with --scalekd-dfm-norm official (F.normalize, the official code's 0/0): what the fix removes."""
    task = _resnet18_task(dfm_norm='official')
    task.train()
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    norms = term_gradient_norms(task, x, y, task.get_eval_model().parameters())
    assert not norms['loss_s4_alt'] < 1e3 * norms['loss_cls'], norms
    assert 'loss_s4_alt' in unbalanced_terms(norms)


def test_official_normalisation_equals_the_formula():
    torch.manual_seed(2)
    p, t = torch.randn(2, 16, 7, 7), torch.randn(2, 16, 7, 7)
    assert torch.equal(feature_distance(p, t, alternative=True, norm='official'), _official_alt(p, t))


def test_loss_balance_measurement_leaves_no_trace():
    """Buffers (BatchNorm statistics), RNG and .grad are as before the measurement."""
    task = _resnet18_task()
    task.train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    buffers = {k: b.clone() for k, b in task.named_buffers()}
    rng = torch.get_rng_state()
    term_gradient_norms(task, x, y, task.get_eval_model().parameters())
    assert all(torch.equal(b, buffers[k]) for k, b in task.named_buffers())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in task.get_trainable_module().parameters())


def test_unbalanced_terms():
    norms = {'loss_cls': 2.0, 'loss_kd': 1.0, 'loss_s4_alt': 2e7, 'loss_s3': float('nan')}
    assert set(unbalanced_terms(norms, 100)) == {'loss_s4_alt', 'loss_s3'}
    assert unbalanced_terms({'loss': 1.0}, 100) == {}


def _load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def _argv(data, out, exp, teacher_ckpt, *extra):
    return ['--data-dir', data, '--model', 'resnet18', '--img-size', '32', '-b', '6', '--epochs', '1', '-j', '0', '--output', str(out),
            '--experiment', exp, '--lr', '0.01', '--warmup-epochs', '0', '--distiller', 'scalekd',
            '--teacher', 'vit_tiny_patch16_224', '--teacher-checkpoint', teacher_ckpt, '--teacher-kwargs',
            *[f'{k}={v}' for k, v in TINY_VIT.items()], '--scalekd-heads-s3', '3', '--scalekd-heads-s4', '3', *extra]


@pytest.fixture(scope='module')
def tiny_vit_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp('teacher') / 'teacher.pth'
    torch.manual_seed(0)
    torch.save({'state_dict': timm.create_model('vit_tiny_patch16_224', num_classes=3, **TINY_VIT).state_dict()}, path)
    return str(path)


def test_geometry_check_refuses_then_allows(image_folder, tiny_vit_ckpt, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / 'out'
    assert train_kd.main(_argv(image_folder, out, 'refused', tiny_vit_ckpt)) == 2
    msg = caplog.text
    for part in ('loss_s4_alt', 'stage-4 map is 1x1', '--img-size 32', '--scalekd-student-s4',
                 '--scalekd-alpha-s4 DIRECT 0', '--scalekd-allow-degenerate'):
        assert part in msg, part
    assert not out.exists()  # refused before anything is written

    caplog.clear()
    assert train_kd.main(_argv(image_folder, out, 'allowed', tiny_vit_ckpt, '--scalekd-allow-degenerate')) == 0
    assert 'student stage-3 2x2, stage-4 1x1' in caplog.text and 'teacher stage-3 2x2' in caplog.text
    with open(out / 'allowed' / 'loss_balance.json') as f:
        balance = json.load(f)
    norms = balance['gradient_norms']
    assert balance['reference'] == 'loss_cls' and balance['over_factor'] == {}
    assert norms['loss_s4_alt'] == 0.0 and all(0 < norms[k] < 1e3 for k in ('loss_cls', 'loss_s3', 'loss_s4'))
    assert 'Loss balance' in caplog.text

    # the view turned off instead: accepted without the override
    assert train_kd.main(_argv(image_folder, out, 'alt_off', tiny_vit_ckpt, '--scalekd-alpha-s4', '0.08', '0')) == 0


def test_loss_balance_warns_and_does_not_change_the_run(image_folder, tiny_vit_ckpt, tmp_path, caplog):
    """The measured run ends with the same weights as an unmeasured one; a low factor triggers the warning."""
    common = ['--scalekd-alpha-s4', '0.08', '0', '--drop-path', '0.1', '--seed', '3']
    assert train_kd.main(_argv(image_folder, tmp_path, 'measured', tiny_vit_ckpt, *common,
                               '--loss-balance-factor', '1e-3')) == 0
    assert 'into the student (limit --loss-balance-factor 0.001)' in caplog.text
    assert train_kd.main(_argv(image_folder, tmp_path, 'plain', tiny_vit_ckpt, *common,
                               '--loss-balance-factor', '0')) == 0
    assert not (tmp_path / 'plain' / 'loss_balance.json').exists()
    a, b = _load(tmp_path / 'measured' / 'last.pth.tar'), _load(tmp_path / 'plain' / 'last.pth.tar')
    for k, v in a['state_dict'].items():
        assert torch.equal(v, b['state_dict'][k]), k
    for k, v in a['task_state']['caps'].items():
        assert torch.equal(v, b['task_state']['caps'][k]), k
