"""train_kd.py end to end on a tiny ImageFolder: outputs, per-term logging, resume, teacher handling."""
import argparse
import csv
import glob
import os

import pytest
import timm
import torch

import models  # noqa: F401
import train_kd
from distillers import build_task, create_teacher, TeacherLoadError


def _load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def _argv(data, out, exp, *extra):
    return ['--data-dir', data, '--model', 'scalekd_demo_resnet', '-b', '6', '--epochs', '1', '-j', '0',
            '--output', str(out), '--experiment', exp, '--lr', '0.01', '--warmup-epochs', '0', '--log-interval', '1',
            *extra]


def test_scalekd_smoke_outputs_and_resume(image_folder, teacher_ckpt, tmp_path):
    argv = _argv(image_folder, tmp_path, 'run', '--distiller', 'scalekd', '--teacher', 'scalekd_demo_vit',
                 '--teacher-checkpoint', teacher_ckpt, '--model-ema')
    assert train_kd.main(argv) == 0
    run = tmp_path / 'run'
    assert (run / 'args.yaml').is_file() and (run / 'last.pth.tar').is_file()
    assert glob.glob(str(run / 'tb' / 'events.out.tfevents.*'))
    with open(run / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    for term in ('loss', 'loss_cls', 'loss_kd', 'loss_s3', 'loss_s3_alt', 'loss_s4', 'loss_s4_alt'):
        assert float(rows[0][f'train_{term}']) > 0, term
    for col in ('eval_top1', 'eval_top5', 'eval_ema_top1', 'eval_ema_top5', 'lr'):
        assert col in rows[0]
    # the weighted total is the weighted sum of the logged terms (each term is averaged the same way)
    w = dict(loss_cls=0.5, loss_kd=0.5, loss_s3=0.08, loss_s3_alt=0.06, loss_s4=0.08, loss_s4_alt=0.06)
    assert float(rows[0]['train_loss']) == pytest.approx(sum(v * float(rows[0][f'train_{k}']) for k, v in w.items()),
                                                         rel=1e-4)

    ckpt = _load(run / 'last.pth.tar')
    assert ckpt['epoch'] == 0
    student = timm.create_model('scalekd_demo_resnet', num_classes=3)
    student.load_state_dict(ckpt['state_dict'], strict=True)  # a bare timm student
    student.load_state_dict(ckpt['state_dict_ema'], strict=True)
    assert set(ckpt['task_state']['caps']) and all(k.startswith(('s3_', 's4_')) for k in ckpt['task_state']['caps'])

    # resume: continues at epoch 1 and appends one summary row
    assert train_kd.main(argv[:argv.index('--epochs') + 1] + ['2'] + argv[argv.index('--epochs') + 2:] +
                         ['--resume', str(run / 'last.pth.tar')]) == 0
    with open(run / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    assert [r['epoch'] for r in rows] == ['0', '1']
    assert _load(run / 'last.pth.tar')['epoch'] == 1


def test_kd_and_none_distillers_log_their_terms(image_folder, teacher_ckpt, tmp_path):
    assert train_kd.main(_argv(image_folder, tmp_path, 'kd', '--distiller', 'kd', '--teacher', 'scalekd_demo_vit',
                               '--teacher-checkpoint', teacher_ckpt)) == 0
    with open(tmp_path / 'kd' / 'summary.csv') as f:
        header = next(csv.reader(f))
    assert {'train_loss', 'train_loss_cls', 'train_loss_kd'} <= set(header)
    assert not any(h.startswith('train_loss_s') for h in header)
    assert train_kd.main(_argv(image_folder, tmp_path, 'none')) == 0
    assert (tmp_path / 'none' / 'last.pth.tar').is_file()


@pytest.mark.parametrize('distiller', ['kd', 'scalekd'])
def test_teacher_frozen_unchanged_and_eval(distiller):
    torch.manual_seed(0)
    student = timm.create_model('scalekd_demo_resnet', num_classes=3)
    teacher = timm.create_model('scalekd_demo_vit', num_classes=3, drop_path_rate=0.1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    kw = dict(img_size=(32, 32)) if distiller == 'scalekd' else {}
    task = build_task(distiller, student, teacher, **kw)
    opt = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.5)
    task.train()
    assert not task.teacher.training and not any(m.training for m in task.teacher.modules())
    assert task.get_trainable_module().training
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    out = task(x, y)
    out['loss'].backward()
    opt.step()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not any(p is q for p in task.get_trainable_module().parameters() for q in teacher.parameters())
    # the official behaviour is opt-in
    task_train = build_task(distiller, timm.create_model('scalekd_demo_resnet', num_classes=3), teacher,
                            teacher_mode='train', **kw)
    task_train.train()
    assert task_train.teacher.training


def test_teacher_sees_the_mixed_batch_renormalised():
    """The teacher gets the student's (mixed) batch, re-normalised to its own mean/std."""
    student = timm.create_model('scalekd_demo_resnet', num_classes=3)
    teacher = timm.create_model('scalekd_demo_vit', num_classes=3)
    teacher.pretrained_cfg = dict(teacher.pretrained_cfg, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    task = build_task('kd', student, teacher, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    raw = torch.rand(2, 3, 32, 32)
    x = (raw - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(task.teacher_input(x), (raw - 0.5) / 0.5, atol=1e-5)
    seen = []
    teacher.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    task(x, torch.tensor([0, 1]))
    assert torch.allclose(seen[0], (raw - 0.5) / 0.5, atol=1e-5)


def test_teacher_checkpoint_of_wrong_architecture(teacher_ckpt, tmp_path):
    with pytest.raises(TeacherLoadError) as e:
        create_teacher('scalekd_demo_resnet', num_classes=3, checkpoint=teacher_ckpt)
    msg = str(e.value)
    assert 'does not fit --teacher scalekd_demo_resnet' in msg
    assert 'missing keys' in msg and 'conv1.weight' in msg
    assert 'unexpected keys' in msg and 'blocks.0.attn' in msg
    with pytest.raises(TeacherLoadError, match=r'wrong shape keys: head.bias \(3,\) vs \(5,\), head.weight'):
        create_teacher('scalekd_demo_vit', num_classes=5, checkpoint=teacher_ckpt)


def test_teacher_checkpoint_mismatch_stops_train_kd(image_folder, teacher_ckpt, tmp_path, caplog):
    caplog.set_level('INFO')
    rc = train_kd.main(_argv(image_folder, tmp_path, 'bad', '--distiller', 'kd', '--teacher', 'resnet18',
                             '--teacher-checkpoint', teacher_ckpt))
    assert rc == 2
    assert 'does not fit --teacher resnet18' in caplog.text and 'missing keys' in caplog.text
    # the start-up log names the code (git commit in a checkout) and the library versions
    assert f'torch {torch.__version__}, timm {timm.__version__}' in caplog.text and 'Code: ' in caplog.text
    assert not os.path.exists(tmp_path / 'bad' / 'last.pth.tar')
