"""The baseline distillers next to ScaleKD: DIST (its loss against hand-computed values and its invariances),
timm's pooled-feature and DeiT-token distillation (against timm's own tasks), and train / resume / export runs."""
import copy
import csv
import os
import statistics

import pytest
import safetensors.torch
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import resolve_data_config
from timm.task import FeatureDistillationTask, TokenDistillationTask

import export
import models  # noqa: F401
import train_kd
from config import load_recipe
from distillers import build_task
from distillers.dist import dist_terms, inter_class_relation, intra_class_relation, pearson_rows
from distillers.feature import timm_loss_weights
from distillers.flags import check_distill_args, criterion_kwargs, task_kwargs
from runtime.checkpoint import load_weights_only
from runtime.errors import FatalError

TOKEN_STUDENT = 'deit_tiny_distilled_patch16_224'
TOKEN_KWARGS = dict(img_size=32, patch_size=4, depth=2)  # the real DeiT class, small enough for the CPU


# --- DIST: the loss ------------------------------------------------------------------------------------------------
def test_relations_on_hand_written_probabilities():
    """Three rows: perfectly anti-correlated (1 - (-1) = 2), identical (0), uncorrelated (1): inter = 1."""
    p_s = torch.tensor([[3 / 30, 9 / 30, 18 / 30],     # centred: (-7, -1, 8) / 30
                        [0.2, 0.3, 0.5],
                        [1 / 3 - 0.1, 1 / 3, 1 / 3 + 0.1]])  # centred: (-1, 0, 1) / 10
    p_t = torch.tensor([[17 / 30, 11 / 30, 2 / 30],    # centred: (7, 1, -8) / 30
                        [0.2, 0.3, 0.5],
                        [1 / 3 + 0.1, 1 / 3 - 0.2, 1 / 3 + 0.1]])  # centred: (1, -2, 1) / 10, orthogonal
    assert pearson_rows(p_s, p_t).tolist() == pytest.approx([-1.0, 1.0, 0.0], abs=1e-6)
    assert inter_class_relation(p_s, p_t).item() == pytest.approx(1.0, abs=1e-6)
    # the same probabilities as columns (images x classes transposed): the intra-class term reads them per class
    assert intra_class_relation(p_s.t(), p_t.t()).item() == pytest.approx(1.0, abs=1e-6)
    # two images, two classes: each class column of the student goes up where the teacher's goes down -> 1 - (-1)
    a = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    b = torch.tensor([[0.3, 0.7], [0.6, 0.4]])
    assert intra_class_relation(a, b).item() == pytest.approx(2.0, abs=1e-6)
    assert inter_class_relation(a, b).item() == pytest.approx(2.0, abs=1e-6)  # rows swap order too


@pytest.mark.parametrize('tau', [1.0, 4.0])
def test_dist_terms_match_an_independent_formula(tau):
    g = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(5, 4, generator=g) * 3, torch.randn(5, 4, generator=g) * 3
    p_s = [[float(v) for v in row] for row in F.softmax(z_s.double() / tau, dim=1)]
    p_t = [[float(v) for v in row] for row in F.softmax(z_t.double() / tau, dim=1)]
    inter = 1 - sum(statistics.correlation(p_s[i], p_t[i]) for i in range(5)) / 5
    intra = 1 - sum(statistics.correlation([r[k] for r in p_s], [r[k] for r in p_t]) for k in range(4)) / 4
    got_inter, got_intra = dist_terms(z_s, z_t, tau)
    assert got_inter.item() == pytest.approx(tau ** 2 * inter, rel=1e-5)
    assert got_intra.item() == pytest.approx(tau ** 2 * intra, rel=1e-5)


def test_relations_invariances_and_perfect_agreement():
    g = torch.Generator().manual_seed(1)
    p_s = F.softmax(torch.randn(6, 5, generator=g), dim=1)
    p_t = F.softmax(torch.randn(6, 5, generator=g), dim=1)
    row_scale, row_shift = torch.rand(6, 1, generator=g) * 3 + 0.1, torch.randn(6, 1, generator=g)
    col_scale, col_shift = torch.rand(1, 5, generator=g) * 3 + 0.1, torch.randn(1, 5, generator=g)
    inter, intra = inter_class_relation(p_s, p_t), intra_class_relation(p_s, p_t)
    # inter: one correlation per image, so a positive affine change of each row leaves it unchanged
    assert inter_class_relation(p_s * row_scale + row_shift, p_t).item() == pytest.approx(inter.item(), abs=1e-5)
    assert inter_class_relation(p_s, p_t * row_scale + row_shift).item() == pytest.approx(inter.item(), abs=1e-5)
    # intra: one correlation per class, so a positive affine change of each column leaves it unchanged
    assert intra_class_relation(p_s * col_scale + col_shift, p_t).item() == pytest.approx(intra.item(), abs=1e-5)
    # ... and the other change does move each term (the checks above are not vacuous)
    assert abs(inter_class_relation(p_s * col_scale + col_shift, p_t).item() - inter.item()) > 1e-3
    assert abs(intra_class_relation(p_s * row_scale + row_shift, p_t).item() - intra.item()) > 1e-3
    # a negative scale flips the correlation
    assert inter_class_relation(-p_s, p_t).item() == pytest.approx(2 - inter.item(), abs=1e-5)
    # softmax ignores a per-row shift of the logits, so both DIST terms do
    z_s, z_t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    base = dist_terms(z_s, z_t, 2.0)
    shifted = dist_terms(z_s + torch.randn(6, 1, generator=g) * 5, z_t, 2.0)
    assert [v.item() for v in shifted] == pytest.approx([v.item() for v in base], abs=1e-5)
    # perfect agreement: both terms vanish
    assert [v.item() for v in dist_terms(z_s, z_s.clone(), 1.0)] == pytest.approx([0.0, 0.0], abs=1e-6)
    assert inter_class_relation(p_s, p_s * 2 + 1).item() == pytest.approx(0.0, abs=1e-6)


def test_dist_divides_by_the_norm_product_plus_eps_as_the_official_code():
    """A confident teacher (margin 17): many class columns have |a| |b| near or below eps = 1e-8, where the official
    ``/ (|a| |b| + eps)`` and a floor ``/ max(|a| |b|, eps)`` differ. The term and its gradient are the official
    form's (fp64, a hand-written reference), measurably away from the floor's."""
    g = torch.Generator().manual_seed(0)
    z_t = torch.randn(8, 10, generator=g, dtype=torch.float64)
    z_t[torch.arange(8), torch.arange(8) % 3] += 17.0  # 7 of the 10 classes are nobody's top-1
    z_s = (torch.randn(8, 10, generator=g, dtype=torch.float64) * 2).requires_grad_()

    def intra(p_s, p_t, floor):
        a, b = p_s.t() - p_s.t().mean(1, keepdim=True), p_t.t() - p_t.t().mean(1, keepdim=True)
        norms = a.norm(dim=1) * b.norm(dim=1)
        return 1 - ((a * b).sum(1) / (norms.clamp_min(1e-8) if floor else norms + 1e-8)).mean()

    p_s, p_t = F.softmax(z_s, dim=1), F.softmax(z_t, dim=1)
    official, floored = intra(p_s, p_t, False), intra(p_s, p_t, True)
    got = dist_terms(z_s, z_t, 1.0)[1]
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(official.item(), rel=1e-12)
    assert abs(floored.item() - official.item()) > 2e-3 * official.item()  # the two forms differ here
    grad_got, = torch.autograd.grad(got, z_s, retain_graph=True)
    grad_official, = torch.autograd.grad(official, z_s, retain_graph=True)
    grad_floored, = torch.autograd.grad(floored, z_s)
    assert torch.allclose(grad_got, grad_official, rtol=1e-10, atol=1e-15)
    assert (grad_floored - grad_official).norm() > 0.1 * grad_official.norm()


def test_dist_task_weights_its_terms_and_trains_the_student():
    torch.manual_seed(0)
    student = timm.create_model('scalekd_demo_resnet', num_classes=3)
    teacher = timm.create_model('scalekd_demo_vit', num_classes=3)
    task = build_task('dist', student, teacher, dist_alpha=0.7, dist_beta=1.5, dist_gamma=3.0, kd_temperature=2.0)
    assert task.loss_weights == {'loss_cls': 0.7, 'loss_inter': 1.5, 'loss_intra': 3.0}
    task.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    out = task(x, y)
    z_s = out['output'].detach()  # the training-mode student logits the terms were computed from
    with torch.no_grad():
        z_t = teacher(x)
    inter, intra = dist_terms(z_s, z_t, 2.0)
    assert out['loss_cls'].item() == pytest.approx(F.cross_entropy(z_s, y).item(), rel=1e-5)
    assert out['loss_inter'].item() == pytest.approx(inter.item(), rel=1e-5)
    assert out['loss_intra'].item() == pytest.approx(intra.item(), rel=1e-5)
    assert out['loss'].item() == pytest.approx(0.7 * out['loss_cls'].item() + 1.5 * inter.item() + 3.0 * intra.item(),
                                               rel=1e-5)
    out['loss'].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


# --- feature and token: timm's tasks in this project's teacher handling ----------------------------------------------
@pytest.mark.parametrize('weights', [(None, None), (5.0, None), (None, 0.3), (2.0, 0.5)])
def test_feature_first_step_equals_timm_feature_task(weights):
    distill_w, task_w = weights
    torch.manual_seed(0)
    student = timm.create_model('scalekd_demo_resnet', num_classes=3)  # 256-wide pooled features
    teacher = timm.create_model('scalekd_demo_vit', num_classes=3)     # 96-wide
    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    task = build_task('feature', student, teacher, distill_loss_weight=distill_w, task_loss_weight=task_w)
    proj = task.trainable_module.projection
    assert task.feature_dims == (256, 96) and (proj.in_features, proj.out_features) == (256, 96)
    ref = FeatureDistillationTask(ref_student, ref_teacher, distill_loss_weight=distill_w, task_loss_weight=task_w,
                                  verbose=False)
    ref.trainable_module.projection.load_state_dict(proj.state_dict())
    assert (task.loss_weights['loss_cls'], task.loss_weights['loss_feat']) == \
        (ref.task_loss_weight, ref.distill_loss_weight) == timm_loss_weights(distill_w, task_w)
    task.train(), ref.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    out, want = task(x, y), ref(x, y)
    assert out['loss_cls'].item() == pytest.approx(want['task_loss'].item(), rel=1e-5)
    assert out['loss_feat'].item() == pytest.approx(want['kd_loss'].item(), rel=1e-5)
    assert out['loss'].item() == pytest.approx(want['loss'].item(), rel=1e-5)
    # and by hand from the models' own pieces (eval-mode teacher; the student's batch statistics as in training)
    with torch.no_grad():
        f_t = teacher.forward_head(teacher.forward_features(x), pre_logits=True)
        ref_student.train()
        f_s = proj(ref_student.forward_head(ref_student.forward_features(x), pre_logits=True))
    assert out['loss_feat'].item() == pytest.approx(((f_s - f_t) ** 2).mean().item(), rel=1e-5)
    # the feature term alone sends gradient into the student's stem and the projection
    g_stem, g_proj = torch.autograd.grad(out['loss_feat'], [student.conv1.weight, proj.weight], retain_graph=True)
    assert g_stem.abs().sum() > 0 and g_proj.abs().sum() > 0
    out['loss'].backward()
    assert torch.isfinite(out['loss'])
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in [*student.parameters(), *proj.parameters()])
    assert all(p.grad is None for p in teacher.parameters())
    # the projection is distillation state, not part of the student: validated / exported model = the student
    assert task.get_eval_model() is student and set(task.get_task_state()) == {'projection'}


def test_feature_refuses_a_teacher_of_unknown_pooled_width():
    class Bare(nn.Module):  # forward_features / forward_head but no num_features
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward_features(self, x):
            return self.conv(x)

        def forward_head(self, x, pre_logits=False):
            return x.mean((2, 3))

        def forward(self, x):
            return self.forward_head(self.forward_features(x))

    student = timm.create_model('scalekd_demo_resnet', num_classes=3)
    with pytest.raises(FatalError, match=r"width of the teacher's pooled features is unknown \(Bare has neither"):
        build_task('feature', student, Bare())
    with pytest.raises(FatalError, match='the teacher .Sequential. has no forward_features / forward_head'):
        build_task('feature', student, nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3)))


@pytest.mark.parametrize('distill_type', ['soft', 'hard'])
def test_token_loss_equals_timm_token_task(distill_type):
    torch.manual_seed(0)
    student = timm.create_model(TOKEN_STUDENT, num_classes=3, **TOKEN_KWARGS)
    teacher = timm.create_model('scalekd_demo_vit', num_classes=3)
    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    task = build_task('token', student, teacher, distill_type=distill_type, kd_temperature=3.0, task_loss_weight=0.5)
    ref = TokenDistillationTask(ref_student, ref_teacher, distill_type=distill_type, temperature=3.0,
                                task_loss_weight=0.5, verbose=False)
    assert task.loss_weights == {'loss_cls': 0.5, 'loss_token': 0.5}
    task.train(), ref.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    out, want = task(x, y), ref(x, y)
    assert out['loss_cls'].item() == pytest.approx(want['task_loss'].item(), rel=1e-5)
    assert out['loss_token'].item() == pytest.approx(want['distill_loss'].item(), rel=1e-5)
    assert out['loss'].item() == pytest.approx(want['loss'].item(), rel=1e-5)
    out['loss'].backward()
    assert student.dist_token.grad.abs().sum() > 0 and student.head_dist.weight.grad.abs().sum() > 0
    # eval mode: one logit tensor, the mean of the two heads (what validate.py and the exported file give)
    student.eval()
    with torch.no_grad():
        feats = student.forward_features(x)
        assert torch.allclose(student(x), (student.head(feats[:, 0]) + student.head_dist(feats[:, 1])) / 2, atol=1e-6)


def test_token_refuses_a_student_without_a_distillation_token():
    teacher = timm.create_model('scalekd_demo_vit', num_classes=3)
    for student in (timm.create_model('scalekd_demo_resnet', num_classes=3),
                    timm.create_model('deit_tiny_patch16_224', num_classes=3, **TOKEN_KWARGS)):
        with pytest.raises(FatalError, match=r'--distiller token needs a student with a distillation token .*'
                                             r'(ResNet|VisionTransformer) has none.*deit_base_distilled_patch16_224'):
            build_task('token', student, teacher)
    # the fix the message names: a DeiT built with the token (its export loads with the same model kwargs)
    student = timm.create_model('deit_tiny_patch16_224', num_classes=3, distilled=True, **TOKEN_KWARGS)
    assert build_task('token', student, teacher).trainable_module.distilled_training


# --- train_kd.py: two steps, checkpoint, resume, export -------------------------------------------------------------
def _rows(run):
    with open(run / 'summary.csv') as f:
        return list(csv.DictReader(f))


RUNS = {  # distiller -> (student flags, its loss terms)
    'dist': (['--model', 'scalekd_demo_resnet'], ('loss_cls', 'loss_inter', 'loss_intra')),
    'token': (['--model', TOKEN_STUDENT, '--img-size', '32', '--token-distill-type', 'hard', '--model-kwargs',
               *(f'{k}={v}' for k, v in TOKEN_KWARGS.items())], ('loss_cls', 'loss_token')),
    'feature': (['--model', 'scalekd_demo_resnet'], ('loss_cls', 'loss_feat')),
}


@pytest.mark.parametrize('distiller', ['dist', 'token', 'feature'])
def test_distiller_trains_resumes_and_exports(distiller, image_folder, teacher_ckpt, tmp_path, one_thread):
    """12 images at -b 6: two steps an epoch; epoch 0, then a resume for epoch 1, then the plain timm export."""
    student_flags, terms = RUNS[distiller]
    argv = ['--data-dir', image_folder, '-b', '6', '-j', '0', '--output', str(tmp_path), '--experiment', 'run',
            '--lr', '0.01', '--warmup-epochs', '0', '--log-interval', '1', '--distiller', distiller,
            '--teacher', 'scalekd_demo_vit', '--teacher-checkpoint', teacher_ckpt, *student_flags]
    run = tmp_path / 'run'
    assert train_kd.main(argv + ['--epochs', '1']) == 0
    rows = _rows(run)
    assert len(rows) == 1
    weights = dict(dist=(1.0, 2.0, 2.0)).get(distiller, (1.0, 1.0))  # the paper's DIST values; timm's defaults
    values = [float(rows[0][f'train_{t}']) for t in terms]
    assert all(v > 0 for v in values), dict(zip(terms, values))
    assert float(rows[0]['train_loss']) == pytest.approx(sum(w * v for w, v in zip(weights, values)), rel=1e-4)
    ckpt = load_weights_only(run / 'last.pth.tar')
    assert ckpt['epoch'] == 0
    assert set(ckpt.get('task_state') or {}) == ({'projection'} if distiller == 'feature' else set())

    assert train_kd.main(argv + ['--epochs', '2', '--resume', str(run / 'last.pth.tar')]) == 0
    assert [r['epoch'] for r in _rows(run)] == ['0', '1']
    ckpt = load_weights_only(run / 'last.pth.tar')
    assert ckpt['epoch'] == 1

    out = export.export_main(['--checkpoint', str(run / 'last.pth.tar'), '--output',
                              str(tmp_path / 'student.safetensors')])
    state = safetensors.torch.load_file(out['output'])
    name = student_flags[1]
    plain = timm.create_model(name, num_classes=3, **(TOKEN_KWARGS if distiller == 'token' else {}))
    plain.load_state_dict(state, strict=True)  # a plain timm model: no projection, nothing of the task
    assert state.keys() == ckpt['state_dict'].keys()
    assert all(torch.equal(state[k], v) for k, v in ckpt['state_dict'].items())
    if distiller == 'token':
        assert {'dist_token', 'head_dist.weight'} <= set(state) and not plain.distilled_training


def test_bad_baseline_inputs_stop_before_step_0(image_folder, teacher_ckpt, tmp_path, caplog):
    base = ['--data-dir', image_folder, '-b', '6', '-j', '0', '--output', str(tmp_path), '--epochs', '1',
            '--teacher', 'scalekd_demo_vit', '--teacher-checkpoint', teacher_ckpt, '--model', 'scalekd_demo_resnet']
    caplog.clear()
    assert train_kd.main(base + ['--experiment', 'tok', '--distiller', 'token']) == 2
    assert '--distiller token needs a student with a distillation token' in caplog.text
    assert not (tmp_path / 'tok' / 'summary.csv').exists()
    caplog.clear()
    assert train_kd.main(base + ['--experiment', 'neg', '--distiller', 'dist', '--dist-beta', '-1']) == 2
    assert '--dist-beta -1 is too small' in caplog.text
    with pytest.raises(SystemExit) as e:
        train_kd.main(base[:2] + ['-b', '1'] + base[4:] + ['--experiment', 'one', '--distiller', 'dist'])
    assert e.value.code == 2


# --- the baseline recipes ----------------------------------------------------------------------------------------
BASELINE_RECIPES = {'swinl_r50_dist': 'dist', 'swinl_r50_feature': 'feature', 'swinl_deitb_token': 'token'}


@pytest.mark.parametrize('name', list(BASELINE_RECIPES))
def test_baseline_recipe_builds_its_task_at_224(name, one_thread):
    """Each recipe's flags reach its task (through task_kwargs, as train_kd.py passes them); the real student at 224
    px steps once with a small stand-in teacher (Swin-T: the recipes' Swin-L is 197 M params)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'recipes', name + '.yaml')
    parser = train_kd.build_parser()
    parser.set_defaults(**load_recipe(path, parser))
    args = parser.parse_args([])
    check_distill_args(parser.error, args)  # no weight the distiller does not use (a recipe key counts as set)
    text = open(path).read()
    assert args.distiller == BASELINE_RECIPES[name] and args.teacher.startswith('swin_large')
    assert 'kd_temperature:' in text  # set explicitly: this project's default (1.0) is not timm's train.py's (4.0)
    assert 'Paper number: none' in text or any(n in text.split('\n\n', 1)[0] for n in ('80.2', '83.4'))
    torch.manual_seed(0)
    student = timm.create_model(args.model, num_classes=1000, **args.model_kwargs)
    teacher = timm.create_model('swin_tiny_patch4_window7_224', num_classes=1000)
    data_config = resolve_data_config(vars(args), model=student)
    img_size = tuple(data_config['input_size'][-2:])
    task = build_task(args.distiller, student, teacher, criterion_kwargs=criterion_kwargs(args),
                      **task_kwargs(args, img_size), mean=data_config['mean'], std=data_config['std'])
    if args.distiller == 'dist':
        assert task.loss_weights == {'loss_cls': 1.0, 'loss_inter': 2.0, 'loss_intra': 2.0}
    elif args.distiller == 'token':
        assert task.distill_type == 'hard' and student.distilled_training
    else:
        assert task.feature_dims == (2048, 768)  # ResNet-50-D -> Swin-T here (1536 with the recipe's Swin-L)
    task.train()
    out = task(torch.randn(2, 3, *img_size), torch.tensor([3, 7]))
    assert set(task.loss_weights) <= set(out) and all(torch.isfinite(out[k]) for k in task.loss_weights)
    out['loss'].backward()
    assert all(p.grad is None for p in teacher.parameters())
