"""The benchmark's reference step matches ScaleKDTask, and the step breakdown runs end to end."""
import json
import math
import time

import pytest
import timm
import torch

import models  # noqa: F401  registers the demo models
from benchmarks import step_breakdown
from benchmarks.reference_step import dct_matrix, dct_remove_dc, idct_matrix, reference_forward
from distillers import build_task


def _demo_pair():
    student = timm.create_model('scalekd_demo_resnet', num_classes=10)
    teacher = timm.create_model('scalekd_demo_vit', num_classes=10)
    return student, teacher, (32, 32)


def _swin_pair():
    # a small Swin (4 stages of one block) so the Swin tail (patch merging + last stage + norm) is covered
    student = timm.create_model('scalekd_demo_resnet', num_classes=10)
    teacher = timm.create_model('swin_tiny_patch4_window7_224', embed_dim=24, depths=(1, 1, 1, 1),
                                num_heads=(1, 1, 1, 1), img_size=64, window_size=4, num_classes=10)
    return student, teacher, (64, 64)


def _grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('n', [4, 7, 14])
def test_dct_matrices_invert_and_remove_the_mean(n):
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(idct_matrix(n, dtype=torch.float64) @ dct_matrix(n, dtype=torch.float64), eye)
    # un-normalised DCT-II: the DC coefficient of a constant signal of ones is 2n
    assert dct_matrix(n, dtype=torch.float64).sum(1)[0].item() == pytest.approx(2 * n)
    x = torch.randn(2, 3, n, n, dtype=torch.float64) + 5.0
    torch.testing.assert_close(dct_remove_dc(x), x - x.mean((2, 3), keepdim=True))
    assert dct_remove_dc(x).mean((2, 3)).abs().max() < 1e-12


@pytest.mark.parametrize('pair', [_demo_pair, _swin_pair], ids=['vit_teacher', 'swin_teacher'])
def test_reference_step_matches_optimised_step(pair):
    torch.manual_seed(0)
    student, teacher, img_size = pair()
    task = build_task('scalekd', student, teacher, img_size=img_size, verbose=False)
    task.train()
    module = task.trainable_module
    x = torch.randn(4, 3, *img_size)
    y = torch.randint(0, 10, (4,))

    out = task(x, y)
    out['loss'].backward()
    grads = _grads(module)
    module.zero_grad(set_to_none=True)
    ref = reference_forward(task, x, y)
    ref['loss'].backward()
    ref_grads = _grads(module)

    loss_keys = sorted(k for k in out if k.startswith('loss'))
    assert loss_keys == sorted(k for k in ref if k.startswith('loss'))
    assert {'loss_s3', 'loss_s3_alt', 'loss_s4', 'loss_s4_alt', 'loss_kd', 'loss_cls'} <= set(loss_keys)
    for k in loss_keys:
        torch.testing.assert_close(ref[k], out[k], rtol=1e-4, atol=1e-6, msg=f'{k} differs')
    torch.testing.assert_close(ref['output'], out['output'])

    # every trained parameter gets a gradient from both, and the gradients agree; parameters whose
    # gradient is zero in exact arithmetic (conv bias before BN, key bias under softmax) are compared
    # against the overall gradient scale
    assert set(grads) == set(ref_grads)
    assert any(n.startswith('caps.s3_b') for n in grads) and any(n.startswith('student.conv1') for n in grads)
    scale = max(g.abs().max().item() for g in grads.values())
    assert scale > 0
    for n in grads:
        torch.testing.assert_close(ref_grads[n], grads[n], rtol=1e-4, atol=1e-5 * scale, msg=f'grad of {n} differs')


def test_reference_alternative_view_is_not_the_direct_view():
    # the check above would pass trivially if the DCT view were a no-op; make sure it is not
    torch.manual_seed(0)
    student, teacher, img_size = _demo_pair()
    task = build_task('scalekd', student, teacher, img_size=img_size, verbose=False)
    x = torch.randn(2, 3, *img_size) + 1.0
    with torch.no_grad():
        _, t4 = task.teacher_targets(x)
    assert (dct_remove_dc(t4) - t4).abs().max() > 1e-3


def test_step_breakdown_end_to_end(tmp_path):
    path = tmp_path / 'bench.json'
    t0 = time.time()
    rc = step_breakdown.main([
        '--model', 'scalekd_demo_resnet', '--teacher', 'scalekd_demo_vit', '--img-size', '32', '--num-classes', '10',
        '-b', '4', '--device', 'cpu', '-j', '0', '--steps', '2', '--warmup', '1', '--threads', '1', '--no-heap-cache',
        '--json', str(path)])
    assert rc == 0
    assert time.time() - t0 < 60
    result = json.loads(path.read_text())
    for key in ('ratio_step_to_sum_of_parts', 'ratio_step_to_student_step', 'speedup_vs_reference',
                'speedup_vs_reference_same_precision', 'trainer_step_img_per_s',
                'ratio_trainer_to_full_step_img_per_s'):
        assert math.isfinite(result[key]) and result[key] > 0, key
    parts = result['parts']
    for name in ('data', 'teacher_fwd', 'student_fb', 'heads_fb', 'optimizer', 'task_fwd', 'scalekd_step',
                 'student_step', 'reference_step', 'trainer_step'):
        assert parts[name]['ms'] > 0, name
    # the reference runs at the step's precision; the trainer row is train_kd's own loop over the JPEG loader
    assert result['reference_dtype'] == 'float32' and result['mode'] == 'eager'
    assert result['speedup_vs_reference_same_precision'] == pytest.approx(parts['reference_step']['ms'] /
                                                                          parts['scalekd_step']['ms'])
    # the console figure (StepTimer's mean of per-update img/s) against the fixed-batch full step
    assert result['ratio_trainer_to_full_step_img_per_s'] == pytest.approx(
        result['trainer_step_img_per_s'] / parts['scalekd_step']['img_per_s'])
    assert result['trainer_updates'] >= 3 * result['prefetch_depth']
    assert result['data_timed_batches'] >= 3 * result['prefetch_depth']
    assert result['data'].startswith('generated JPEG files')
    # the ratios are the ones the table's times give
    step = parts['scalekd_step']['ms']
    assert result['ratio_step_to_student_step'] == pytest.approx(step / parts['student_step']['ms'])
    assert result['speedup_vs_reference'] == pytest.approx(parts['reference_step']['ms'] / step)
    assert result['sum_of_parts_ms'] == pytest.approx(
        sum(parts[p]['ms'] for p in ('teacher_fwd', 'student_fb', 'heads_fb', 'optimizer')))
    # FLOPs: the full step does the work of its parts, and more than the plain student step
    flops = {k: v['gflop'] for k, v in parts.items()}
    assert flops['scalekd_step'] == pytest.approx(flops['teacher_fwd'] + flops['student_fb'] + flops['heads_fb'],
                                                  rel=0.02)
    assert flops['scalekd_step'] > flops['student_step'] > 0
    assert flops['reference_step'] >= flops['scalekd_step']
    assert result['reference_max_rel_loss_diff'] < 1e-4


def test_step_breakdown_needs_a_teacher(capsys):
    with pytest.raises(SystemExit):
        step_breakdown.parse_args(['--model', 'scalekd_demo_resnet'])
    assert '--teacher' in capsys.readouterr().err


def test_step_breakdown_compiled_mode(tmp_path):
    """--torchcompile: the task's compiled forward is timed (aot_eager here: no C++ build), with the same-precision
    reference, the trainer row and bf16 autocast with the teacher held in bf16."""
    path = tmp_path / 'bench.json'
    rc = step_breakdown.main([
        '--model', 'scalekd_demo_resnet', '--teacher', 'scalekd_demo_vit', '--img-size', '32', '--num-classes', '10',
        '-b', '2', '--device', 'cpu', '-j', '0', '--steps', '1', '--warmup', '1', '--threads', '1', '--no-heap-cache',
        '--torchcompile', 'aot_eager', '--amp', '--jpeg-dir', str(tmp_path / 'jpeg'), '--json', str(path)])
    assert rc == 0
    result = json.loads(path.read_text())
    assert result['mode'] == 'compiled' and result['amp'] == 'bfloat16'
    assert result['reference_dtype'] == 'bfloat16 autocast'
    assert {'task_fwd', 'scalekd_step', 'reference_step', 'trainer_step'} <= set(result['parts'])
    assert not {'student_fb', 'heads_fb', 'student_step'} & set(result['parts'])  # they would run eagerly
    assert result['speedup_vs_reference_same_precision'] > 0 and result['trainer_step_img_per_s'] > 0
    assert len(list((tmp_path / 'jpeg' / 'train').rglob('*.jpg'))) >= 2 * result['trainer_updates']


@pytest.mark.parametrize('name, peak', [('NVIDIA H200', 989.4), ('NVIDIA H100 80GB HBM3', 989.4),
                                        ('NVIDIA H100 PCIe', 756.0), ('NVIDIA A100-SXM4-80GB', 312.0),
                                        ('NVIDIA L40S', 362.1), ('NVIDIA L4', 121.0), ('Tesla V100-SXM2-32GB', None)])
def test_dense_bf16_peak_by_device_name(name, peak):
    assert step_breakdown.dense_bf16_peak(name)[1] == peak


def test_gpu_check_tiny_mode_on_cpu(tmp_path):
    """benchmarks/gpu_check.sh in its CPU mode (demo pairs, eager only here): every pair's JSON carries the
    same-precision speed-up and the trainer-step img/s, and the summary prints one line per pair and mode."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TINY='1', MODES='eager', STEPS='1', WARMUP='1', OUT_DIR=str(tmp_path / 'out'),
               PYTHON=sys.executable, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1')
    proc = subprocess.run(['bash', os.path.join(root, 'benchmarks', 'gpu_check.sh')], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'dense bf16 peak table' in proc.stdout and 'H100 989.4' in proc.stdout
    for name in ('swinl_r50', 'swinl_vitb'):
        result = json.loads((tmp_path / 'out' / f'{name}_eager.json').read_text())
        for key in ('speedup_vs_reference_same_precision', 'trainer_step_img_per_s'):
            assert math.isfinite(result[key]) and result[key] > 0, (name, key)
        assert result['amp'] == 'bfloat16' and result['full_step']['img_per_s'] > 0
        summary = [line for line in proc.stdout.splitlines() if line.startswith(f'{name:<12} eager')]
        assert len(summary) == 1, proc.stdout[-2000:]
    joint = json.loads((tmp_path / 'out' / 'joint_r50.json').read_text())
    assert joint['n_students'] == 3 and joint['distiller'] == 'scalekd,kd,dist' and joint['speedup'] > 0


def test_multi_student_benchmark_runs_the_teacher_once_per_joint_round(tmp_path):
    """benchmarks/multi_student.py: one after another, each of the 3 steps runs the teacher; jointly, once per round;
    the JSON carries what the issue names (speedup, ideal, teacher_share, n_students), consistent with each other."""
    from benchmarks import multi_student
    out = tmp_path / 'multi.json'
    r = multi_student.main(['--model', 'scalekd_demo_resnet', '--teacher', 'scalekd_demo_vit', '--img-size', '32',
                            '--num-classes', '10', '-b', '4', '--device', 'cpu', '--threads', '1', '--steps', '2',
                            '--warmup', '1', '--distiller', 'kd,dist,scalekd', '--json', str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    assert r['teacher_forwards_per_round'] == {'solo': 3, 'joint': 1, 'teacher': 1}
    assert r['n_students'] == 3 and 0 < r['teacher_share'] < 1
    assert r['ideal'] == pytest.approx(1 / (1 - r['teacher_share'] * 2 / 3))
    assert r['speedup'] == pytest.approx(r['joint_img_per_s'] / r['solo_img_per_s'])
