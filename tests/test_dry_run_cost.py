"""--dry-run's projected cost: the arithmetic of runtime.dryrun.projected_cost on known inputs, and the block a real
tiny dry run prints (its numbers consistent with the run's loader, schedule and validation folder)."""
import logging
import re

import pytest

import train_kd
from runtime.dryrun import projected_cost


def test_projected_cost_arithmetic():
    numbers, block = projected_cost(step_s=0.5, teacher_s=0.2, steps_per_epoch=1000, epochs=300, val_batches=25,
                                    val_step_s=0.4, world_size=8)
    assert numbers['train_s'] == pytest.approx(0.5 * 1000 * 300)  # 150,000 s
    assert numbers['val_s'] == pytest.approx(0.4 * 25 * 300)  # 3,000 s: every epoch validated
    assert numbers['wall_s'] == pytest.approx(153000)
    assert numbers['device_hours'] == pytest.approx(153000 * 8 / 3600)  # 340 GPU-hours
    assert numbers['teacher_share'] == pytest.approx(0.4)
    assert '300 epochs x 1000 steps x 0.500 s = 41.67 h (41 h 40 min)' in block
    assert '300 passes x 25 batches x 0.400 s = 0.83 h (0 h 50 min)' in block
    assert 'wall time 42.50 h (42 h 30 min); 340.00 GPU-hours (x 8)' in block
    assert 'teacher: 200.0 ms of the 500.0 ms step (40.0%)' in block
    # validated every 10th epoch, no teacher, validation size unknown
    numbers, block = projected_cost(0.1, None, 10, 100, 5, 0.05, 1, val_passes=10, device='cpu')
    assert numbers['wall_s'] == pytest.approx(0.1 * 10 * 100 + 0.05 * 5 * 10) and numbers['teacher_share'] is None
    assert 'CPU-process-hours' in block and 'teacher:' not in block
    numbers, block = projected_cost(0.1, 0.05, 10, 100, None, 0.05, 2)
    assert numbers['val_s'] is None and numbers['wall_s'] == pytest.approx(100) and 'not included' in block


def test_a_tiny_dry_run_prints_the_projected_cost(image_folder, teacher_ckpt, tmp_path, one_thread, caplog,
                                                  monkeypatch):
    monkeypatch.chdir(train_kd.os.path.dirname(train_kd.os.path.abspath(train_kd.__file__)))
    caplog.set_level(logging.INFO)
    argv = ['--config', 'recipes/demo_fmnist.yaml', '--data-dir', image_folder, '--teacher-checkpoint', teacher_ckpt,
            '--output', str(tmp_path / 'out'), '--experiment', 'dry', '-b', '4', '-vb', '5', '-j', '0', '--epochs', '7',
            '--val-interval', '3', '--dry-run']
    assert train_kd.main(argv) == 0
    assert not (tmp_path / 'out').exists()
    logged = '\n'.join(r.getMessage() for r in caplog.records)
    block = logged[logged.index('Projected cost'):]
    # 12 training images, batch 4: 3 steps; 7 epochs (no cooldown in the demo recipe); validated after epochs
    # 3, 6 and 7; 12 validation images, batch 5: 3 batches
    m = re.search(r'train: 7 epochs x 3 steps x ([\d.]+) s = ', block)
    assert m, block
    step = re.search(r'step times [\d.]+, ([\d.]+) s', logged).group(1)
    assert m.group(1) == f'{float(step):.3f}'
    assert re.search(r'validation: 3 passes x 3 batches x [\d.]+ s = .*\(12 images in validation/\)', block), block
    assert re.search(r'wall time [\d.]+ s; [\d.]+ CPU-process-hours \(x 1\)', block), block
    share = re.search(r'teacher: ([\d.]+) ms of the ([\d.]+) ms step \(([\d.]+)%\)', block)
    assert share and 0 < float(share.group(3)) < 100
    assert float(share.group(3)) == pytest.approx(100 * float(share.group(1)) / float(share.group(2)), abs=0.1)
