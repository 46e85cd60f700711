"""train_kd.py --dry-run: every check, the loss balance, parameter counts and two timed steps, then exit 0 with
nothing written; bad input is refused exactly as without it."""
import logging

import train_kd


def _argv(data, out, teacher_ckpt, *extra):
    return ['--config', 'recipes/demo_fmnist.yaml', '--data-dir', data, '--teacher-checkpoint', teacher_ckpt,
            '--output', str(out), '--experiment', 'dry', '-b', '6', '-j', '0', *extra]


def test_dry_run_reports_and_writes_nothing(image_folder, teacher_ckpt, tmp_path, one_thread, caplog, monkeypatch):
    monkeypatch.chdir(train_kd.os.path.dirname(train_kd.os.path.abspath(train_kd.__file__)))
    caplog.set_level(logging.INFO)
    assert train_kd.main(_argv(image_folder, tmp_path / 'out', teacher_ckpt, '--dry-run')) == 0
    assert not (tmp_path / 'out').exists()
    logged = '\n'.join(r.getMessage() for r in caplog.records)
    assert 'ScaleKD grids at 32x32 px' in logged and 'Loss balance (gradient norm' in logged
    assert 'Dry run: student 1.25 M params' in logged and 'M trained' in logged and 'teacher 0.46 M frozen' in logged
    assert 'step times' in logged and 'img/s' in logged and 'loss_s4_alt' in logged
    assert 'nothing was written' in logged


def test_dry_run_refuses_what_a_run_refuses(image_folder, teacher_ckpt, tmp_path, one_thread, caplog, monkeypatch):
    monkeypatch.chdir(train_kd.os.path.dirname(train_kd.os.path.abspath(train_kd.__file__)))
    # a teacher file whose head has 5 classes, on 3-class data
    import torch
    import timm
    path = tmp_path / 't5.pth'
    torch.save({'state_dict': timm.create_model('scalekd_demo_vit', num_classes=5).state_dict()}, path)
    assert train_kd.main(_argv(image_folder, tmp_path / 'out', str(path), '--dry-run')) == 2
    assert not (tmp_path / 'out').exists()
    msg = [r.getMessage() for r in caplog.records if r.levelname == 'ERROR'][-1]
    assert "the teacher's head has 5 classes" in msg and 'the data has 3' in msg
