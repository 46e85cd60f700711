"""timm train.py's distillation flags (--kd-model-name, --kd-distill-type, --distill-loss-weight,
--task-loss-weight) work here with timm's meaning, and map onto this project's spelling exactly."""
import csv

import pytest
import timm
import torch

import models  # noqa: F401
from runtime.checkpoint import load_weights_only
import train_kd
from distillers import build_task
from distillers.flags import check_distill_args, loss_weights, task_kwargs

TEACHER = 'scalekd_demo_vit'


def _parse(*argv):
    parser = train_kd.build_parser()
    args = parser.parse_args(['--data-dir', 'unused', '--model', 'scalekd_demo_resnet', *argv])
    check_distill_args(parser.error, args)
    return args


@pytest.mark.parametrize('flags, expected', [
    ((), (0.5, 0.5)),                                                     # this project's --kd-weight default
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
