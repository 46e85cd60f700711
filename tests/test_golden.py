"""Golden run: a short demo-pair ScaleKD training is bit-identical to the one recorded in tests/golden/.

``test_golden_scalekd_demo_run`` trains ``scalekd_demo_resnet`` from ``scalekd_demo_vit`` (a teacher
written here from seed 0) on the tiny random ImageFolder of conftest.py, in-process through
``train_kd.main``, for 2 epochs of 4 updates with EMA, drop-path 0.1, recovery checkpoints every
3 updates and a log line every update. It pins, exactly (``float.hex`` / sha256 of the bytes):

* every loss term (loss, loss_cls, loss_kd, loss_s3, loss_s3_alt, loss_s4, loss_s4_alt) of every
  call of ``ScaleKDTask.forward``, in order: the loss-balance measurement on the first batch of a
  fresh run, then each training step;
* the final ``last.pth.tar``: student ``state_dict``, ``state_dict_ema``, the projectors in
  ``task_state`` and the optimizer state (momentum buffers and param groups);
* the loss and eval columns of ``summary.csv``.

A code change that moves code without changing behaviour keeps this test green. One that changes
the numbers on purpose regenerates the file and says so in its commit:

    GOLDEN_UPDATE=1 .venv/bin/python -m pytest -q tests/test_golden.py

The run uses one intra-op thread and no loader workers (bitwise reproducible on one machine and
torch/timm version). Another CPU type may round differently in the last bit (the kernels torch picks depend on
the instruction set): each CPU type has its own record, ``scalekd_demo_run.json`` (recorded first) and
``scalekd_demo_run.<capability>.json`` (``torch.backends.cpu.get_cpu_capability()``, e.g. avx512, which
``GOLDEN_UPDATE=1`` writes), and the run must equal one of them bit for bit. Every record is made by the same
code: a change of numbers regenerates them all (one per machine type) and says so in its commit.
"""
import argparse
import csv
import glob
import hashlib
import json
import os

import pytest
import timm
import torch

import models  # noqa: F401
import train_kd
from conftest import make_image_folder
from distillers.scalekd import ScaleKDTask

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden', 'scalekd_demo_run.json')
TERMS = ('loss', 'loss_cls', 'loss_kd', 'loss_s3', 'loss_s3_alt', 'loss_s4', 'loss_s4_alt')
SUMMARY_COLS = ('epoch', 'train_loss', 'train_loss_cls', 'train_loss_kd', 'train_loss_s3', 'train_loss_s3_alt',
                'train_loss_s4', 'train_loss_s4_alt', 'train_nonfinite_skipped', 'eval_loss', 'eval_top1',
                'eval_top5', 'eval_ema_loss', 'eval_ema_top1', 'eval_ema_top5', 'lr')


def _digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f'{t.dtype} {tuple(t.shape)}'.encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b'')
    return h.hexdigest()


def _flatten(obj, prefix=''):
    """Nested dicts/lists of tensors and numbers -> {path: sha256 or float.hex or repr}."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f'{prefix}{k}.' if not isinstance(v, torch.Tensor) else f'{prefix}{k}'))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f'{prefix}{i}.' if not isinstance(v, torch.Tensor) else f'{prefix}{i}'))
        return out
    key = prefix.rstrip('.')
    if isinstance(obj, torch.Tensor):
        return {key: _digest(obj)}
    if isinstance(obj, float):
        return {key: obj.hex()}
    return {key: repr(obj)}


def _run(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / 'data', classes=3, per_class=8)
    torch.manual_seed(0)
    teacher = timm.create_model('scalekd_demo_vit', num_classes=3)
    torch.save({'state_dict': teacher.state_dict()}, tmp_path / 'teacher.pth')

    calls = []
    forward = ScaleKDTask.forward

    def recording_forward(self, input, target):
        out = forward(self, input, target)
        calls.append({k: out[k].item().hex() for k in TERMS})
        return out

    monkeypatch.setattr(ScaleKDTask, 'forward', recording_forward)
    argv = ['--data-dir', data, '--model', 'scalekd_demo_resnet', '--distiller', 'scalekd',
            '--teacher', 'scalekd_demo_vit', '--teacher-checkpoint', str(tmp_path / 'teacher.pth'),
            '-b', '6', '--epochs', '2', '-j', '0', '--lr', '0.05', '--warmup-epochs', '1', '--sched-on-updates',
            '--model-ema', '--model-ema-decay', '0.9', '--drop-path', '0.1', '--recovery-interval', '3',
            '--log-interval', '1', '--seed', '7', '--output', str(tmp_path / 'out'), '--experiment', 'golden']
    assert train_kd.main(argv) == 0
    run = tmp_path / 'out' / 'golden'
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(run / 'last.pth.tar', map_location='cpu', weights_only=True)
    with open(run / 'summary.csv') as f:
        summary = [{k: r[k] for k in SUMMARY_COLS if k in r} for r in csv.DictReader(f)]
    return {
        'steps': calls,
        'epoch': ckpt['epoch'],
        'state_dict': _flatten(ckpt['state_dict']),
        'state_dict_ema': _flatten(ckpt['state_dict_ema']),
        'task_state': _flatten(ckpt['task_state']),
        'optimizer': _flatten(ckpt['optimizer']),
        'summary': summary,
    }


def test_golden_scalekd_demo_run(tmp_path, monkeypatch, one_thread):
    got = _run(tmp_path, monkeypatch)
    assert len(got['steps']) == 1 + 2 * 4  # the loss-balance pass on the first batch, then 2 epochs of 4 updates
    own = GOLDEN.replace('.json', f'.{torch.backends.cpu.get_cpu_capability().lower()}.json')
    if os.environ.get('GOLDEN_UPDATE'):
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(own, 'w') as f:
            json.dump(got, f, indent=1, sort_keys=True)
            f.write('\n')
        pytest.skip(f'golden file written: {own}')
    records = {}
    for path in sorted(glob.glob(GOLDEN.replace('.json', '*.json'))):
        with open(path) as f:
            records[path] = json.load(f)
    if any(got == want for want in records.values()):
        return  # bit for bit one of the recorded runs
    # no record matches: show where the run departs from this CPU type's record (else the first)
    want = records.get(own) or next(iter(records.values()))
    for i, (g, w) in enumerate(zip(got['steps'], want['steps'])):
        assert g == w, f'forward call {i}: loss terms differ ({ {k: float.fromhex(v) for k, v in g.items()} } vs ' \
                       f'{ {k: float.fromhex(v) for k, v in w.items()} })'
    assert len(got['steps']) == len(want['steps'])
    for part in ('state_dict', 'state_dict_ema', 'task_state', 'optimizer'):
        diff = sorted(k for k in set(got[part]) | set(want[part]) if got[part].get(k) != want[part].get(k))
        assert not diff, f'{part}: {len(diff)} entries differ, e.g. {diff[:5]}'
    assert got['epoch'] == want['epoch']
    assert got['summary'] == want['summary']
