"""timm train.py's distillation flags (--kd-model-name, --kd-distill-type, --distill-loss-weight,
--task-loss-weight) work here with timm's meaning, and map onto this project's spelling exactly."""
import copy
import csv

import pytest
import timm
import torch
from timm.task import LogitDistillationTask

import models  # noqa: F401
from config import parse_args_with_recipe
from runtime.checkpoint import load_weights_only
from runtime.errors import FatalError
import train_kd
from distillers import build_task, kd_loss
from distillers.flags import check_distill_args, criterion_kwargs, describe_kd_settings, loss_weights, task_kwargs
from distillers.preflight import check_feature_dims

TEACHER = 'scalekd_demo_vit'


def _parse(*argv):
    parser = train_kd.build_parser()
    args = parser.parse_args(['--data-dir', 'unused', '--model', 'scalekd_demo_resnet', *argv])
    check_distill_args(parser.error, args)
    return args


@pytest.mark.parametrize('flags, expected', [
    ((), (1.0, 1.0)),                                                     # timm's spelling, nothing set: timm's
    (('--kd-temperature', '2'), (1.0, 1.0)),                              # ... also when only T is set
    (('--kd-weight', '0.75'), (0.25, 0.75)),
    (('--distill-loss-weight', '0.7'), (1.0, 0.7)),                       # timm: task weight stays 1.0
    (('--task-loss-weight', '0.25'), (0.25, 0.75)),                       # timm: distill weight is 1 - task
    (('--distill-loss-weight', '2', '--task-loss-weight', '0.5'), (0.5, 2.0)),  # both: independent
])
def test_weight_rules(flags, expected):
    args = _parse('--kd-model-name', TEACHER, *flags)
    assert loss_weights(args) == pytest.approx(expected)


def test_kd_model_name_alone_turns_logit_kd_on():
    args = _parse('--kd-model-name', TEACHER)
    assert (args.distiller, args.teacher) == ('kd', TEACHER)
    args = _parse('--teacher', TEACHER, '--kd-distill-type', 'logit')
    assert args.distiller == 'kd'
    # an explicit --distiller is kept; --kd-model-name only names its teacher
    args = _parse('--distiller', 'scalekd', '--kd-model-name', TEACHER)
    assert (args.distiller, args.teacher) == ('scalekd', TEACHER)
    # the same name twice is not a conflict
    assert _parse('--teacher', TEACHER, '--kd-model-name', TEACHER).teacher == TEACHER


@pytest.mark.parametrize('flags, needle', [
    (('--teacher', 'vit_tiny_patch16_224', '--kd-model-name', TEACHER, '--distiller', 'kd'), '--kd-model-name'),
    (('--kd-model-name', TEACHER, '--distill-loss-weight', '-0.5'), '--distill-loss-weight'),
    (('--kd-model-name', TEACHER, '--task-loss-weight', 'nan'), '--task-loss-weight'),
    (('--kd-model-name', TEACHER, '--task-loss-weight', '1.5'), '--task-loss-weight'),
    (('--distill-loss-weight', '0.5'), 'need a teacher'),
    (('--kd-distill-type', 'logit'), 'need a teacher'),
    (('--distiller', 'scalekd', '--kd-model-name', TEACHER, '--kd-distill-type', 'logit'), '--distiller scalekd'),
    (('--distiller', 'dist', '--kd-model-name', TEACHER, '--task-loss-weight', '0.5'), '--dist-alpha'),
    # two weight flags that contradict, or a weight the distiller does not use: no flag is dropped silently
    (('--kd-model-name', TEACHER, '--kd-weight', '0.3', '--distill-loss-weight', '1'), '--distill-loss-weight'),
    (('--kd-model-name', TEACHER, '--kd-weight', '0.3', '--task-loss-weight', '0.5'), '--task-loss-weight'),
    (('--distiller', 'dist', '--teacher', TEACHER, '--kd-weight', '0.3'), '--dist-alpha'),
    (('--kd-model-name', TEACHER, '--kd-distill-type', 'feature', '--kd-weight', '0.3'), 'not used by --distiller feature'),
    (('--kd-model-name', TEACHER, '--kd-distill-type', 'token', '--kd-weight', '0.3'), 'not used by --distiller token'),
    (('--kd-weight', '0.3'), 'not used by --distiller none'),
    # timm's feature widths belong to the feature distiller only
    (('--kd-model-name', TEACHER, '--kd-student-feature-dim', '256'), 'only apply to --distiller feature'),
    (('--distiller', 'scalekd', '--teacher', TEACHER, '--kd-teacher-feature-dim', '96'), '--kd-teacher-feature-dim'),
])
def test_contradictions_stop_at_parse_time(flags, needle, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(*flags)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize('kd_type, distiller', [('feature', 'feature'), ('token', 'token')])
def test_kd_distill_type_selects_timm_task_with_timm_weights(kd_type, distiller):
    args = _parse('--kd-model-name', TEACHER, '--kd-distill-type', kd_type, '--task-loss-weight', '0.25',
                  '--kd-token-distill-type', 'hard')
    assert args.distiller == distiller and args.token_distill_type == 'hard'
    kw = task_kwargs(args, (32, 32))
    assert (kw['task_loss_weight'], kw['distill_loss_weight']) == (0.25, None)  # timm's task applies its rule
    assert 'kd_weight' not in kw


def test_task_gets_timm_weights(teacher_ckpt):
    args = _parse('--kd-model-name', TEACHER, '--distill-loss-weight', '2', '--task-loss-weight', '0.5',
                  '--kd-temperature', '4')
    torch.manual_seed(0)
    student = timm.create_model('scalekd_demo_resnet', num_classes=3)
    teacher = timm.create_model(TEACHER, num_classes=3)
    task = build_task(args.distiller, student, teacher, **task_kwargs(args, (32, 32)))
    assert task.loss_weights == {'loss_cls': 0.5, 'loss_kd': 2.0} and task.kd_temperature == 4.0
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    out = task(x, y)
    assert torch.equal(out['loss'], 0.5 * out['loss_cls'] + 2.0 * out['loss_kd'])


def test_timm_command_line_runs_unchanged_and_equals_project_spelling(image_folder, teacher_ckpt, tmp_path, one_thread):
    """A distillation line as written for timm's train.py (plus the local teacher file: no hub here) trains
    exactly as this project's --distiller kd spelling: same losses, same weights."""
    common = ['--data-dir', image_folder, '--model', 'scalekd_demo_resnet', '-b', '6', '--epochs', '1', '-j', '0',
              '--lr', '0.01', '--warmup-epochs', '0', '--seed', '1', '--output', str(tmp_path),
              '--teacher-checkpoint', teacher_ckpt]
    timm_line = ['--kd-model-name', TEACHER, '--kd-distill-type', 'logit', '--kd-loss-type', 'kl',
                 '--distill-loss-weight', '0.75', '--task-loss-weight', '0.25', '--kd-temperature', '4.0']
    ours = ['--distiller', 'kd', '--teacher', TEACHER, '--kd-weight', '0.75', '--kd-temperature', '4.0']
    assert train_kd.main(common + ['--experiment', 'timm'] + timm_line) == 0
    assert train_kd.main(common + ['--experiment', 'ours'] + ours) == 0
    rows = {}
    for exp in ('timm', 'ours'):
        with open(tmp_path / exp / 'summary.csv') as f:
            rows[exp] = list(csv.DictReader(f))[0]
    for col in ('train_loss', 'train_loss_cls', 'train_loss_kd'):
        assert float(rows['timm'][col]) > 0
        assert rows['timm'][col] == rows['ours'][col], col
    weights = {exp: load_weights_only(str(tmp_path / exp / 'last.pth.tar'))['state_dict']
               for exp in ('timm', 'ours')}
    assert all(torch.equal(weights['timm'][k], weights['ours'][k]) for k in weights['ours'])


# --- timm's defaults when timm's spelling names the teacher and nothing sets T or a weight --------------------------
def _parse_recipe(tmp_path, recipe, *argv):
    path = tmp_path / 'recipe.yaml'
    path.write_text(recipe)
    parser = train_kd.build_parser()
    args, text = parse_args_with_recipe(
        parser, ['--config', str(path), '--data-dir', 'unused', '--model', 'scalekd_demo_resnet', *argv])
    check_distill_args(parser.error, args)
    return args, text


@pytest.mark.parametrize('flags, temperature, weights', [
    (('--kd-model-name', TEACHER), 4.0, (1.0, 1.0)),                            # timm train.py's defaults
    (('--kd-model-name', TEACHER, '--kd-distill-type', 'token'), 4.0, None),    # timm's token task: T 4 too
    (('--distiller', 'kd', '--teacher', TEACHER), 1.0, (0.5, 0.5)),             # this project's spelling: unchanged
    (('--distiller', 'scalekd', '--kd-model-name', TEACHER), 1.0, (0.5, 0.5)),  # not a timm task: this project's
    (('--distiller', 'dist', '--kd-model-name', TEACHER), 1.0, None),           # DIST's tau stays the paper's 1.0
    (('--kd-model-name', TEACHER, '--kd-weight', '0.25'), 4.0, (0.75, 0.25)),   # each unset value: timm's
])
def test_unset_values_take_the_defaults_of_the_teacher_spelling(flags, temperature, weights):
    args = _parse(*flags)
    assert args.kd_temperature == temperature  # written back: the checkpoint's args hold what is trained
    if weights is not None:
        assert loss_weights(args) == weights
        kw = task_kwargs(args, (32, 32))
        assert (kw['task_weight'], kw['kd_weight'], kw['kd_temperature']) == (*weights, temperature)
    assert describe_kd_settings(args).startswith(f'--distiller {args.distiller}: temperature {temperature:g}')
    # resolving again (a second check of the same args) changes nothing and refuses nothing
    before = dict(vars(args))
    check_distill_args(train_kd.build_parser().error, args)
    assert vars(args) == before


def test_a_recipe_value_counts_as_set(tmp_path, capsys):
    args, _ = _parse_recipe(tmp_path, 'kd_temperature: 2.0\n', '--kd-model-name', TEACHER)
    assert (args.kd_temperature, loss_weights(args)) == (2.0, (1.0, 1.0))
    args, _ = _parse_recipe(tmp_path, 'kd_weight: 0.25\n', '--kd-model-name', TEACHER)
    assert (args.kd_temperature, loss_weights(args)) == (4.0, (0.75, 0.25))
    with pytest.raises(SystemExit):  # the recipe's kd_weight and the command line's timm weight contradict
        _parse_recipe(tmp_path, 'kd_weight: 0.25\n', '--kd-model-name', TEACHER, '--distill-loss-weight', '1')
    assert "--kd-weight 0.25 and --distill-loss-weight both set the loss weights" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse_recipe(tmp_path, 'distiller: dist\nteacher: x\nkd_weight: 0.5\n')
    assert "(or the recipe key 'kd_weight') is not used by --distiller dist" in capsys.readouterr().err


def test_kd_model_name_alone_first_step_equals_timm_logit_task():
    """`--kd-model-name X` and nothing else: the first step's loss, its terms and the student's gradient are those of
    timm's LogitDistillationTask with timm train.py's defaults (T 4.0, neither weight flag: 1.0 and 1.0), fp64."""
    args = _parse('--kd-model-name', TEACHER)
    torch.manual_seed(0)
    student = timm.create_model('scalekd_demo_resnet', num_classes=5).double()
    teacher = timm.create_model(TEACHER, num_classes=5).double()
    with torch.no_grad():
        teacher.head.weight.mul_(30.0)  # a teacher with an opinion (a random one is near uniform at T 4)
    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    crit = criterion_kwargs(args)
    assert crit == dict(loss_type='ce', soft_targets=False, smoothing=0.1)  # timm train.py's defaults too
    task = build_task(args.distiller, student, teacher, criterion_kwargs=crit, **task_kwargs(args, (32, 32)))
    ref = LogitDistillationTask(ref_student, ref_teacher, criterion_kwargs=crit, temperature=4.0, verbose=False)
    task.train(), ref.train()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 32, 32, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 0])
    out, want = task(x, y), ref(x, y)
    print(f"\nfirst-step loss: this project {out['loss'].item():.12f} (loss_cls {out['loss_cls'].item():.12f}, "
          f"loss_kd {out['loss_kd'].item():.12f}); timm {want['loss'].item():.12f} (task_loss "
          f"{want['task_loss'].item():.12f}, kd_loss {want['kd_loss'].item():.12f})")
    assert out['loss'].dtype == torch.float64 and out['loss_kd'].item() > 1e-3
    for mine, theirs in (('loss', 'loss'), ('loss_cls', 'task_loss'), ('loss_kd', 'kd_loss')):
        assert torch.allclose(out[mine], want[theirs], rtol=1e-12, atol=0), (mine, out[mine], want[theirs])
    out['loss'].backward()
    want['loss'].backward()
    pairs = list(zip(student.named_parameters(), ref_student.named_parameters()))
    assert pairs and all(n == m for (n, _), (m, _) in pairs)
    for (name, p), (_, q) in pairs:
        assert torch.allclose(p.grad, q.grad, rtol=1e-9, atol=1e-15), name
    # the value is timm's KL, not the soft-target cross-entropy (KL + T^2 x the teacher's entropy) ScaleKD logs
    soft_ce = kd_loss(out['output'].detach(), ref_teacher(x).detach(), 4.0)
    assert soft_ce.item() > out['loss_kd'].item() + 1e-3


def test_feature_dims_are_checked_against_the_models(image_folder, teacher_ckpt, tmp_path, caplog, one_thread):
    """timm's --kd-student-feature-dim / --kd-teacher-feature-dim: the models' widths run, others stop before step 0
    naming both numbers."""
    args = _parse('--kd-model-name', TEACHER, '--kd-distill-type', 'feature', '--kd-student-feature-dim', '256',
                  '--kd-teacher-feature-dim', '96')
    student, teacher = timm.create_model('scalekd_demo_resnet'), timm.create_model(TEACHER)
    check_feature_dims(args, student, teacher)  # the demo pair's pooled widths: 256 and 96
    args.kd_teacher_feature_dim = 128
    with pytest.raises(FatalError, match='--kd-teacher-feature-dim 128 does not match the teacher .* 96 wide'):
        check_feature_dims(args, student, teacher)
    argv = ['--data-dir', image_folder, '--model', 'scalekd_demo_resnet', '-b', '4', '--epochs', '1', '-j', '0',
            '--output', str(tmp_path), '--experiment', 'dims', '--teacher-checkpoint', teacher_ckpt,
            '--kd-model-name', TEACHER, '--kd-distill-type', 'feature', '--kd-student-feature-dim', '200']
    assert train_kd.main(argv) == 2
    assert '--kd-student-feature-dim 200 does not match the student scalekd_demo_resnet, whose pooled pre-logits ' \
           'features are 256 wide' in caplog.text
    assert not (tmp_path / 'dims').exists()


def test_timm_line_alone_logs_its_settings_reloads_and_resumes(image_folder, teacher_ckpt, tmp_path, caplog,
                                                               one_thread):
    """`--kd-model-name X` alone: the start-up log states T 4 and weights 1 / 1; args.yaml keeps the unset values
    unset and loads back to the same settings; the run resumes under the same command line."""
    argv = ['--data-dir', image_folder, '--model', 'scalekd_demo_resnet', '-b', '6', '--epochs', '1', '-j', '0',
            '--lr', '0.01', '--warmup-epochs', '0', '--seed', '1', '--output', str(tmp_path), '--experiment', 'run',
            '--teacher-checkpoint', teacher_ckpt, '--kd-model-name', TEACHER]
    caplog.set_level('INFO')
    assert train_kd.main(argv) == 0
    assert ("--distiller kd: temperature 4, student loss weight 1, distillation weight 1; values not set take timm "
            "train.py's defaults") in caplog.text
    text = (tmp_path / 'run' / 'args.yaml').read_text()
    assert 'kd_temperature: null' in text and 'kd_weight: null' in text
    parser = train_kd.build_parser()
    again, _ = parse_args_with_recipe(parser, ['--config', str(tmp_path / 'run' / 'args.yaml')])
    check_distill_args(parser.error, again)
    assert (again.distiller, again.kd_temperature, loss_weights(again)) == ('kd', 4.0, (1.0, 1.0))
    assert train_kd.main(argv + ['--epochs', '2', '--resume', str(tmp_path / 'run' / 'last.pth.tar')]) == 0
    with open(tmp_path / 'run' / 'summary.csv') as f:
        assert [r['epoch'] for r in csv.DictReader(f)] == ['0', '1']
