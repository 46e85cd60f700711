"""One training loop for one or many students: a joint run (--model A,B) is a solo run with more students. Each test
here is a defect a second loop had: the joint run must accept what a solo run accepts with the same meaning (or
refuse it the same way), give each student its own settings, and let a student fail alone everywhere."""
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch
import yaml

import models  # noqa: F401
import train_kd
from conftest import load_ckpt as _load, make_image_folder, state_hash as _hash, summary_rows as _rows
from distillers.logit import KDTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIR = ('--model', 'scalekd_demo_resnet,scalekd_demo_resnet', '--distiller', 'scalekd,kd')
SUBS = ('scalekd_demo_resnet-scalekd', 'scalekd_demo_resnet-kd')


def _argv(data, teacher, out, exp, *extra, lr=True):
    return ['--data-dir', data, '-b', '6', '--epochs', '2', '-j', '0', *(('--lr', '0.01') if lr else ()),
            '--warmup-epochs', '0', '--log-interval', '1', '--teacher', 'scalekd_demo_vit', '--teacher-checkpoint',
            teacher, '--no-plot', '--output', str(out), '--experiment', exp, *extra]


def _nan_kd(monkeypatch, from_call=0):
    """KD's loss goes non-finite from its ``from_call``-th forward on (ScaleKD's stays finite)."""
    orig, calls = KDTask.forward, []

    def forward(self, input, target):
        out = orig(self, input, target)
        calls.append(1)
        if len(calls) > from_call:
            out['loss_kd'] = out['loss_kd'] * float('nan')
            out['loss'] = out['loss'] + out['loss_kd']
        return out
    monkeypatch.setattr(KDTask, 'forward', forward)


def test_kd_model_name_trains_kd_in_a_joint_run_as_in_a_solo_run(image_folder, teacher_ckpt, tmp_path, one_thread):
    """timm's --kd-model-name alone turns logit KD on (T=4, weights 1/1) for every student of a joint run too."""
    argv = ['--data-dir', image_folder, '-b', '6', '--epochs', '1', '-j', '0', '--lr', '0.01', '--warmup-epochs', '0',
            '--kd-model-name', 'scalekd_demo_vit', '--teacher-checkpoint', teacher_ckpt, '--no-plot',
            '--output', str(tmp_path), '--loss-balance-factor', '0']
    assert train_kd.main(argv + ['--model', 'scalekd_demo_resnet,scalekd_demo_mixer', '--experiment', 'j']) == 0
    assert sorted(os.listdir(tmp_path / 'j')) == ['scalekd_demo_mixer-kd', 'scalekd_demo_resnet-kd']
    assert train_kd.main(argv + ['--model', 'scalekd_demo_resnet', '--experiment', 'solo']) == 0
    joint, solo = _rows(tmp_path / 'j' / 'scalekd_demo_resnet-kd'), _rows(tmp_path / 'solo')
    assert 'train_loss_kd' in joint[0] and joint[0]['train_loss_kd'] == solo[0]['train_loss_kd']
    with open(tmp_path / 'j' / 'scalekd_demo_resnet-kd' / 'args.yaml') as f:
        saved = yaml.safe_load(f)
    assert saved['kd_model_name'] == 'scalekd_demo_vit' and saved['distiller'] == 'kd'


def test_teacher_kwargs_img_size_reaches_every_student(image_folder, tmp_path, one_thread, caplog):
    """--teacher-kwargs img_size=48 (a teacher built for 48 px, fed the 32 px batch resized) applies to each student;
    the joint run equals its solo runs and runs the teacher once per batch."""
    import timm
    torch.manual_seed(0)
    teacher = tmp_path / 't48.pth'
    torch.save({'state_dict': timm.create_model('scalekd_demo_vit', num_classes=3, img_size=48).state_dict()}, teacher)
    extra = ('--teacher-kwargs', 'img_size=48', '--epochs', '1', '--loss-balance-factor', '0')
    caplog.set_level(logging.INFO)
    assert train_kd.main(_argv(image_folder, str(teacher), tmp_path, 'joint', '--model',
                               'scalekd_demo_resnet,scalekd_demo_mixer', '--distiller', 'kd', *extra)) == 0
    assert re.search(r'Epoch 0: the teacher ran 2 times for 4 student steps', caplog.text)
    for model in ('scalekd_demo_resnet', 'scalekd_demo_mixer'):
        assert train_kd.main(_argv(image_folder, str(teacher), tmp_path, f'solo-{model}', '--model', model,
                                   '--distiller', 'kd', *extra)) == 0
        a = _load(tmp_path / f'solo-{model}' / 'last.pth.tar')
        b = _load(tmp_path / 'joint' / f'{model}-kd' / 'last.pth.tar')
        assert _hash(a['state_dict']) == _hash(b['state_dict']), model
        assert a['args'].teacher_img_size == b['args'].teacher_img_size == 48


def _outcome(argv, capsys, caplog):
    """(exit code, the error message) of a train_kd.py command line, refused at parse time or before step 0."""
    caplog.clear()
    try:
        rc = train_kd.main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    parse = re.findall(r'error: (.*)', err)
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    return rc, (parse or logged or [''])[-1]


# set-up flags a joint run takes exactly as a solo run: the same exit code, the same message when refused
SETUP_FLAGS = [
    ('--sync-bn',), ('--fast-norm',), ('--aug-splits', '2', '--no-prefetcher'), ('--aug-splits', '2'),
    ('--grad-checkpointing',), ('--channels-last',), ('--amp', '--amp-dtype', 'bfloat16'), ('--model-ema',),
    ('--layer-decay', '0.7'), ('--clip-grad', '1', '--clip-mode', 'agc'), ('--grad-accum-steps', '2'),
    ('--teacher-img-size', '40'), ('--teacher-kwargs', 'img_size=40'), ('--bce-loss',), ('--jsd-loss',),
    ('--aug-repeats', '3'), ('--teacher-min-top1', '99.9'), ('--resume', 'auto'),
    ('--split-bn', '--aug-splits', '2'), ('--jsd-loss', '--aug-splits', '2'), ('--drop-block', '0.1'),
    ('--head-init-scale', '0.5'), ('--torchscript',), ('--model-dtype', 'bfloat16'),
]


@pytest.mark.parametrize('flags', SETUP_FLAGS, ids=lambda f: ' '.join(f))
def test_solo_and_joint_agree_on_every_setup_flag(flags, image_folder, teacher_ckpt, tmp_path, one_thread, capsys,
                                                  caplog):
    base = ['--data-dir', image_folder, '-b', '6', '--epochs', '1', '-j', '0', '--lr', '0.01', '--teacher',
            'scalekd_demo_vit', '--teacher-checkpoint', teacher_ckpt, '--distiller', 'kd', '--output', str(tmp_path),
            '--dry-run', '--loss-balance-factor', '0', *flags]
    solo = _outcome(base + ['--model', 'scalekd_demo_resnet', '--experiment', 's'], capsys, caplog)
    joint = _outcome(base + ['--model', 'scalekd_demo_resnet,scalekd_demo_resnet', '--experiment', 'j'], capsys,
                     caplog)
    assert joint[0] == solo[0], (solo, joint)
    # the same words, but for the run folder a message may name
    norm = lambda m: m.replace(os.path.join(str(tmp_path), 'j', 'scalekd_demo_resnet-kd'), 'RUN').replace(
        os.path.join(str(tmp_path), 's'), 'RUN')
    assert norm(joint[1]) == norm(solo[1]), (solo, joint)


def test_nonfinite_at_a_recovery_point_stops_that_student_alone(image_folder, teacher_ckpt, tmp_path, one_thread,
                                                               monkeypatch, caplog):
    """Log steps far apart: the non-finite KD term is found at a recovery point (not a log step); KD stops alone
    there, ScaleKD trains on to the end."""
    _nan_kd(monkeypatch)
    rc = train_kd.main(_argv(image_folder, teacher_ckpt, tmp_path, 'nan', *PAIR, '--log-interval', '100',
                             '--recovery-interval', '1', '--loss-balance-factor', '0'))
    assert rc == 2
    assert re.search(r'Student scalekd_demo_resnet-kd stopped, the other students go on: non-finite loss at update '
                     r'0: gradient, loss, loss_kd', caplog.text)
    assert [r['epoch'] for r in _rows(tmp_path / 'nan' / SUBS[0])] == ['0', '1']
    assert not [f for f in os.listdir(tmp_path / 'nan' / SUBS[1]) if f.endswith('.pth.tar')]
    marker = json.loads((tmp_path / 'nan' / SUBS[1] / 'stopped.json').read_text())
    assert 'loss_kd' in marker['reason'] and marker['epoch'] == 0


def _stop_at(monkeypatch, n):
    """A stop signal (SIGTERM) arrives on the ``n``-th update's check."""
    calls, real = [], train_kd.stop_requested

    def stop(distributed, device):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(distributed, device)
    monkeypatch.setattr(train_kd, 'stop_requested', stop)


def test_nonfinite_found_at_sigterm_stops_one_student_and_the_run_is_requeued(image_folder, teacher_ckpt, tmp_path,
                                                                              one_thread, monkeypatch, caplog):
    _nan_kd(monkeypatch)
    _stop_at(monkeypatch, 1)
    rc = train_kd.main(_argv(image_folder, teacher_ckpt, tmp_path, 'term', *PAIR, '--log-interval', '100',
                             '--loss-balance-factor', '0'))
    assert rc == 75  # the live student got its recovery checkpoint: requeue
    assert os.path.isfile(tmp_path / 'term' / SUBS[0] / 'recovery-0-0.pth.tar')
    assert not os.path.exists(tmp_path / 'term' / SUBS[1] / 'recovery-0-0.pth.tar')
    assert 'Student scalekd_demo_resnet-kd stopped, the other students go on' in caplog.text


def test_resume_after_a_stopped_student_and_a_preemption(image_folder, teacher_ckpt, tmp_path, one_thread,
                                                         monkeypatch, caplog):
    """KD stops (non-finite) in epoch 0; the run is preempted in epoch 1 (ScaleKD has checkpoints of epoch 0 and a
    recovery file of epoch 1, KD none); --resume auto resumes ScaleKD from its own newest position, leaves KD
    stopped and says so; ScaleKD ends equal to an uninterrupted run's."""
    _nan_kd(monkeypatch)
    extra = ('--loss-balance-factor', '0', '--checkpoint-hist', '1', '--sched-on-updates')
    assert train_kd.main(_argv(image_folder, teacher_ckpt, tmp_path, 'ref', *PAIR, *extra)) == 2
    _stop_at(monkeypatch, 3)  # updates: 0, 1 (epoch 0), 2 (epoch 1, first batch)
    assert train_kd.main(_argv(image_folder, teacher_ckpt, tmp_path, 'run', *PAIR, *extra)) == 75
    run = tmp_path / 'run'
    assert os.path.isfile(run / SUBS[0] / 'recovery-1-0.pth.tar')
    monkeypatch.setattr(train_kd, 'stop_requested', lambda distributed, device: False)
    caplog.clear()
    caplog.set_level(logging.INFO)
    assert train_kd.main(_argv(image_folder, teacher_ckpt, tmp_path, 'run', *PAIR, *extra, '--resume', 'auto')) == 2
    assert f"resuming from '{run / SUBS[0] / 'recovery-1-0.pth.tar'}'" in caplog.text
    assert re.search(r'Student scalekd_demo_resnet-kd stopped at epoch 0 .*--resume auto leaves it stopped',
                     caplog.text)
    assert [r['epoch'] for r in _rows(run / SUBS[0])] == ['0', '1']
    a, b = _load(tmp_path / 'ref' / SUBS[0] / 'last.pth.tar'), _load(run / SUBS[0] / 'last.pth.tar')
    assert _hash(a['state_dict']) == _hash(b['state_dict'])
    cols = lambda rows: [{k: v for k, v in r.items() if k.startswith(('train_loss', 'eval_'))} for r in rows]
    assert cols(_rows(run / SUBS[0])) == cols(_rows(tmp_path / 'ref' / SUBS[0]))


def test_a_joint_sub_folder_resumes_as_a_solo_run_without_lr(image_folder, teacher_ckpt, tmp_path, one_thread):
    """Made without --lr (the lr comes from --lr-base and the batch): each sub-folder's args.yaml and checkpoint
    record what its solo run records, so a solo --resume of it continues."""
    assert train_kd.main(_argv(image_folder, teacher_ckpt, tmp_path, 'j', *PAIR, '--epochs', '1',
                               '--loss-balance-factor', '0', lr=False)) == 0
    sub = tmp_path / 'j' / SUBS[1]
    assert _load(sub / 'last.pth.tar')['args'].lr_base_scale == 'linear'
    assert train_kd.main(['--config', str(sub / 'args.yaml'), '--resume', 'auto', '--epochs', '2']) == 0
    assert [r['epoch'] for r in _rows(sub)] == ['0', '1']


def test_teacher_check_refusal_writes_nothing(image_folder, teacher_ckpt, tmp_path, one_thread, caplog):
    """A --teacher-min-top1 refusal comes before args.yaml: the same command with a passing check then starts."""
    argv = _argv(image_folder, teacher_ckpt, tmp_path, 'gate', '--model', 'scalekd_demo_resnet', '--distiller', 'kd',
                 '--epochs', '1', '--loss-balance-factor', '0')
    assert train_kd.main(argv + ['--teacher-min-top1', '99.9']) == 2
    assert 'below --teacher-min-top1 99.9' in caplog.text
    assert not [f for f in os.listdir(tmp_path / 'gate') if f != 'run.lock'] if (tmp_path / 'gate').exists() else True
    assert train_kd.main(argv + ['--teacher-min-top1', '0']) == 0


def test_resume_with_more_processes_than_wrote_the_recovery_checkpoint(tmp_path):
    """A joint run stopped mid-epoch by one process, resumed by two (torchrun): a warning, no IndexError, no hang."""
    data = make_image_folder(tmp_path / 'data', classes=2, per_class=8, splits=('train',))
    import timm
    torch.manual_seed(0)
    torch.save({'state_dict': timm.create_model('scalekd_demo_vit', num_classes=2).state_dict()}, tmp_path / 't.pth')
    argv = ['--data-dir', data, '--val-split', '', '--model', 'scalekd_demo_mixer,scalekd_demo_mixer',
            '--distiller', 'kd', '--teacher', 'scalekd_demo_vit', '--teacher-checkpoint', str(tmp_path / 't.pth'),
            '-b', '2', '--epochs', '1', '--lr', '0.05', '--warmup-epochs', '0', '-j', '0', '--log-interval', '1',
            '--recovery-interval', '1', '--no-plot', '--output', str(tmp_path), '--experiment', 'ws',
            '--resume', 'auto', '--dist-timeout', '60']
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
    env.update(OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', PYTHON=sys.executable)
    proc = subprocess.Popen([sys.executable, 'train_kd.py', *argv], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    seen = 0
    for line in proc.stderr:
        seen += line.startswith('Train:')
        if seen == 6:  # two students log each update: the 3rd update of 8
            proc.send_signal(signal.SIGTERM)
            break
    proc.stderr.read()
    assert proc.wait(timeout=120) == 75
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        env['MASTER_PORT'] = str(s.getsockname()[1])
    done = subprocess.run([os.path.join(ROOT, 'distributed_train.sh'), '2', *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert 'IndexError' not in log
    assert re.search(r'holds the RNG streams of 1 process\(es\), resumed by 2', log)
    for sub in ('scalekd_demo_mixer-kd', 'scalekd_demo_mixer-kd-2'):
        assert [r['epoch'] for r in _rows(tmp_path / 'ws' / sub)] == ['0']


def test_torchcompile_in_a_joint_run_compiles_each_student_and_the_teacher_once(image_folder, teacher_ckpt, tmp_path,
                                                                                 one_thread, caplog):
    """--torchcompile (the graph-capturing 'eager' backend: no C++ build on the CPU) in a joint run: each student's
    task compiled as in its solo run, the shared teacher's features compiled once and run once per batch; the run
    trains what the uncompiled joint run trains."""
    from torch._dynamo.eval_frame import OptimizedModule
    import distillers.memo
    seen = []
    real = distillers.memo.TeacherMemo.compile

    def spy(self, backend='inductor', mode=None):
        real(self, backend, mode)
        seen.append(self.forward_features)
    distillers.memo.TeacherMemo.compile = spy
    try:
        caplog.set_level(logging.INFO)
        extra = ('--epochs', '1', '--loss-balance-factor', '0')
        assert train_kd.main(_argv(image_folder, teacher_ckpt, tmp_path, 'c', *PAIR, *extra,
                                   '--torchcompile', 'eager')) == 0
    finally:
        distillers.memo.TeacherMemo.compile = real
    assert len(seen) == 1 and hasattr(seen[0], '_torchdynamo_orig_callable') or isinstance(seen[0], OptimizedModule)
    assert re.search(r'Epoch 0: the teacher ran 2 times for 4 student steps', caplog.text)
    assert train_kd.main(_argv(image_folder, teacher_ckpt, tmp_path, 'e', *PAIR, *extra)) == 0
    for sub in SUBS:
        a, b = _rows(tmp_path / 'c' / sub), _rows(tmp_path / 'e' / sub)
        assert float(a[0]['train_loss']) == pytest.approx(float(b[0]['train_loss']), rel=1e-5), sub
