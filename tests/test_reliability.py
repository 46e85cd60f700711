"""Issue 7: a run survives kills, preemption and bad input, and says clearly what went wrong.

Subprocess tests (kill -9, SIGTERM) run train_kd.py on a tiny ImageFolder with augmentation,
mixup, drop-path, EMA and per-update LR on, so an exact resume needs every RNG stream and
every piece of state back. The other tests call ``train_kd.main(argv)`` in-process.
"""
import argparse
import csv
import errno
import glob
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import timm
import torch

import models  # noqa: F401
import runtime.checkpoint
import runtime.errors
import runtime.resume
import runtime.saver
import train_kd
from conftest import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4  # updates per epoch in the subprocess runs: 18 images, batch 4 (the last, partial batch is dropped)


def _load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def _rows(run_dir):
    with open(os.path.join(run_dir, 'summary.csv')) as f:
        return list(csv.DictReader(f))


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp('rel')
    data = make_image_folder(root / 'data', classes=3, per_class=6)
    torch.manual_seed(0)
    teacher = timm.create_model('scalekd_demo_vit', num_classes=3)
    torch.save({'state_dict': teacher.state_dict()}, root / 'teacher.pth')
    return root, data, str(root / 'teacher.pth')


# --- subprocess runs: kill -9 and SIGTERM ---------------------------------------------------------------------
def _cmd(assets, exp, *extra):
    root, data, teacher = assets
    return [sys.executable, os.path.join(ROOT, 'train_kd.py'), '--data-dir', data, '--model', 'scalekd_demo_resnet',
            '--distiller', 'scalekd', '--teacher', 'scalekd_demo_vit', '--teacher-checkpoint', teacher,
            '-b', '4', '--epochs', '3', '-j', '0', '--lr', '0.05', '--warmup-epochs', '0', '--sched-on-updates',
            '--drop-path', '0.1', '--mixup', '0.2', '--model-ema', '--seed', '1', '--recovery-interval', '1',
            '--log-interval', '1', '--output', str(root), '--experiment', exp, '--resume', 'auto', *extra]


def _run(cmd, stop_at=None, sig=signal.SIGKILL, delay=0.0):
    """Run ``cmd``; with ``stop_at`` send ``sig`` ``delay`` s after the stop_at-th logged update."""
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1')
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines, seen = [], 0
    try:
        for line in proc.stderr:
            lines.append(line)
            if stop_at and line.startswith('Train:'):
                seen += 1
                if seen == stop_at:
                    time.sleep(delay)
                    proc.send_signal(sig)
                    break
        lines.append(proc.stderr.read())
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, ''.join(lines)


@pytest.fixture(scope='module')
def reference(assets):
    rc, log = _run(_cmd(assets, 'ref'))
    assert rc == 0, log[-3000:]
    return os.path.join(assets[0], 'ref')


def _assert_bitwise_equal(run_dir, ref_dir):
    a, b = _load(os.path.join(ref_dir, 'last.pth.tar')), _load(os.path.join(run_dir, 'last.pth.tar'))
    for key in ('state_dict', 'state_dict_ema'):
        assert a[key].keys() == b[key].keys()
        diff = [k for k in a[key] if not torch.equal(a[key][k], b[key][k])]
        assert not diff, f'{key}: {len(diff)} tensors differ, e.g. {diff[:3]}'
    caps_a, caps_b = a['task_state']['caps'], b['task_state']['caps']
    assert not [k for k in caps_a if not torch.equal(caps_a[k], caps_b[k])]
    mom_a, mom_b = a['optimizer']['state'], b['optimizer']['state']
    assert mom_a.keys() == mom_b.keys()
    assert all(torch.equal(mom_a[i]['momentum_buffer'], mom_b[i]['momentum_buffer']) for i in mom_a)
    losses = lambda rows: [{k: v for k, v in r.items() if k.startswith(('train_loss', 'eval_'))} for r in rows]
    assert losses(_rows(run_dir)) == losses(_rows(ref_dir))


def test_kill9_at_random_steps_and_resume_auto_is_bitwise_exact(assets, reference):
    cmd = _cmd(assets, 'killed')
    rng = random.Random(7)
    kills, from_recovery = 0, 0
    for _ in range(4):
        # a kill lands anywhere in a step (forward, backward, checkpoint write) 1 or 2 updates on
        rc, log = _run(cmd, stop_at=rng.randint(1, 2), delay=rng.uniform(0, 0.2))
        from_recovery += bool(re.search(r"resuming from '.*recovery-\d+-\d+\.pth\.tar'", log))
        if rc == 0:  # finished before the kill point
            break
        assert rc == -signal.SIGKILL, log[-3000:]
        kills += 1
    else:
        rc, log = _run(cmd)
        from_recovery += bool(re.search(r"resuming from '.*recovery-\d+-\d+\.pth\.tar'", log))
        assert rc == 0, log[-3000:]
    assert kills >= 3 and from_recovery >= 2, (kills, from_recovery)
    _assert_bitwise_equal(os.path.join(assets[0], 'killed'), reference)
    # the recovery files were superseded by the epoch checkpoints and removed; no partial files stay
    assert not glob.glob(os.path.join(assets[0], 'killed', 'recovery*'))
    assert not glob.glob(os.path.join(assets[0], 'killed', '*.partial.*'))


def test_sigterm_saves_exits_75_and_resume_continues_at_the_next_batch(assets, reference):
    cmd = _cmd(assets, 'term', '--recovery-interval', '0')  # the only recovery file is the one SIGTERM writes
    rc, log = _run(cmd, stop_at=3, sig=signal.SIGTERM)
    assert rc == runtime.errors.EXIT_PREEMPTED == 75, log[-3000:]
    m = re.search(r'Stopped at epoch (\d+) batch (\d+); recovery checkpoint written', log)
    assert m, log[-3000:]
    epoch, batch = int(m.group(1)), int(m.group(2))
    path = os.path.join(assets[0], 'term', f'recovery-{epoch}-{batch}.pth.tar')
    assert runtime.resume.is_valid_checkpoint(path)
    assert _load(path)['run_state']['batch_idx'] == batch

    rc, log = _run(cmd)
    assert rc == 0, log[-3000:]
    assert f"resuming from '{path}'" in log
    first = re.search(r'^Train: (\d+) \[\s*(\d+)/', log, re.M)
    nxt = (epoch, batch + 1) if batch + 1 < STEPS else (epoch + 1, 0)
    assert (int(first.group(1)), int(first.group(2))) == nxt
    _assert_bitwise_equal(os.path.join(assets[0], 'term'), reference)


# --- in-process runs ---------------------------------------------------------------------------------------------
def _argv(assets, out, exp, *extra, data=None):
    root, image_data, teacher = assets
    return ['--data-dir', data or image_data, '--model', 'scalekd_demo_resnet', '-b', '6', '--epochs', '1', '-j', '0',
            '--lr', '0.01', '--warmup-epochs', '0', '--log-interval', '1', '--output', str(out),
            '--experiment', exp, *extra]


def _kd(assets):
    return ['--distiller', 'scalekd', '--teacher', 'scalekd_demo_vit', '--teacher-checkpoint', assets[2]]


@pytest.mark.parametrize('sig', [signal.SIGUSR1, signal.SIGINT])
def test_usr1_and_ctrl_c_stop_gracefully(assets, tmp_path, monkeypatch, caplog, sig):
    calls = []
    real = train_kd.stop_requested

    def signal_on_second_update(distributed, device):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), sig)
            if sig == signal.SIGINT:
                os.kill(os.getpid(), sig)  # terminal + torchrun: the same Ctrl-C twice is still one stop
        return real(distributed, device)

    monkeypatch.setattr(train_kd, 'stop_requested', signal_on_second_update)
    previous = signal.getsignal(sig)
    rc = train_kd.main(_argv(assets, tmp_path, 'sig', '--epochs', '2'))
    assert rc == 75
    assert os.path.isfile(tmp_path / 'sig' / 'recovery-0-1.pth.tar')
    assert f'Received {sig.name}' in caplog.text and 'Stopped at epoch 0 batch 1' in caplog.text
    assert signal.getsignal(sig) == previous  # handlers restored after the run
    assert not os.path.exists(tmp_path / 'sig' / 'last.pth.tar')


def test_recovery_checkpoint_every_n_updates(assets, tmp_path, monkeypatch):
    saved = []
    real = runtime.saver.RunSaver.save_recovery

    def record(self, epoch, batch_idx=0, run_state=None):
        saved.append((epoch, batch_idx, sorted(run_state['rng'][0]), run_state['epoch_sums']['count']))
        return real(self, epoch, batch_idx, run_state=run_state)

    monkeypatch.setattr(runtime.saver.RunSaver, 'save_recovery', record)
    assert train_kd.main(_argv(assets, tmp_path, 'rec', '-b', '3', '--recovery-interval', '2')) == 0  # 6 updates
    assert [(e, b) for e, b, _, _ in saved] == [(0, 1), (0, 3)]  # after updates 2 and 4, not after the last
    assert saved[0][2] == ['numpy', 'python', 'torch'] and [c for *_, c in saved] == [6, 12]


def test_truncated_and_partial_checkpoints_are_ignored_by_resume_auto(assets, tmp_path, caplog):
    run = tmp_path / 'trunc'
    assert train_kd.main(_argv(assets, tmp_path, 'trunc')) == 0
    good = run / 'last.pth.tar'
    # a newer-looking recovery file cut short, and a temp file of a killed writer
    blob = good.read_bytes()
    (run / 'recovery-1-3.pth.tar').write_bytes(blob[:len(blob) // 2])
    (run / 'recovery_tmp.pth.tar.partial.4242').write_bytes(blob[:100])
    (run / 'checkpoint-0.pth.tar').unlink()
    assert runtime.resume.find_resume('auto', str(run)) == str(good)
    assert "ignoring '" + str(run / 'recovery-1-3.pth.tar') + "' (incomplete or unreadable)" in caplog.text
    assert runtime.resume.find_resume('auto', str(tmp_path / 'nothing_here')) == ''
    # the run continues from the valid checkpoint, and the stale partial file is cleaned up
    assert train_kd.main(_argv(assets, tmp_path, 'trunc', '--epochs', '2', '--resume', 'auto')) == 0
    assert [r['epoch'] for r in _rows(run)] == ['0', '1']
    assert not (run / 'recovery_tmp.pth.tar.partial.4242').exists()


def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / 'last.pth.tar')
    runtime.checkpoint.atomic_torch_save({'state_dict': {'w': torch.ones(3)}, 'epoch': 0}, path)
    real_save = torch.save

    def killed_mid_write(obj, f, *a, **k):
        f.write(b'PK\x03\x04 half a checkpoint')
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(torch, 'save', killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        runtime.checkpoint.atomic_torch_save({'state_dict': {'w': torch.zeros(3)}, 'epoch': 1}, path)
    monkeypatch.setattr(torch, 'save', real_save)
    assert _load(path)['epoch'] == 0 and torch.equal(_load(path)['state_dict']['w'], torch.ones(3))
    assert glob.glob(path + '.partial.*')  # what a killed writer leaves behind
    assert runtime.resume.find_resume('auto', str(tmp_path)) == path


def test_full_disk_while_saving_keeps_the_previous_checkpoint(assets, tmp_path, monkeypatch, caplog):
    real_open = open
    opened = []

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise OSError(errno.ENOSPC, 'No space left on device')

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode='r', *a, **k):
        f = real_open(path, mode, *a, **k)
        if '.partial.' in str(path) and '.pth' in str(path):  # checkpoints (curves.png is written the same way)
            opened.append(path)
            if len(opened) == 2:  # the second epoch's checkpoint hits a full disk
                return FullDisk(f)
        return f

    monkeypatch.setattr(runtime.checkpoint, 'open', fake_open, raising=False)
    rc = train_kd.main(_argv(assets, tmp_path, 'full', '--epochs', '2'))
    assert rc == 2
    assert re.search(r"could not write checkpoint '.*tmp\.pth\.tar' \(No space left on device\); the previous "
                     r"checkpoints are untouched\. Free disk space or pass --output on another disk", caplog.text)
    run = tmp_path / 'full'
    assert _load(run / 'last.pth.tar')['epoch'] == 0
    assert not glob.glob(str(run / '*.partial.*'))


@pytest.mark.parametrize('policy', ['abort', 'skip'])
def test_nan_in_one_loss_term(assets, tmp_path, monkeypatch, caplog, policy):
    import distillers.scalekd as scalekd
    real = scalekd.feature_distance

    def nan_alt_view(p, t, alternative=False, **kwargs):
        d = real(p, t, alternative, **kwargs)
        return d * float('nan') if alternative else d

    monkeypatch.setattr(scalekd, 'feature_distance', nan_alt_view)
    argv = _argv(assets, tmp_path, policy, *_kd(assets), '--nonfinite', policy)
    rc = train_kd.main(argv)
    if policy == 'abort':
        assert rc == 2
        m = re.search(r'non-finite loss at update 0: ([\w, ]+)\.', caplog.text)
        assert m, caplog.text[-2000:]
        named = m.group(1).split(', ')
        assert {'loss_s3_alt', 'loss_s4_alt', 'loss'} <= set(named)
        assert not {'loss_s3', 'loss_s4', 'loss_cls', 'loss_kd'} & set(named)  # the finite terms are not blamed
        assert not os.path.exists(tmp_path / policy / 'last.pth.tar')
    else:
        assert rc == 0
        assert 'update skipped (3/10)' in caplog.text  # 18 images, batch 6: every update of the epoch
        assert float(_rows(tmp_path / policy)[0]['train_nonfinite_skipped']) == 3
        # past --nonfinite-max-skips the run stops
        caplog.clear()
        assert train_kd.main(argv + ['--nonfinite-max-skips', '1', '--experiment', 'skip2']) == 2
        assert 'more than 1 updates had a non-finite loss' in caplog.text


def test_teacher_min_top1_gate(assets, tmp_path, caplog):
    argv = _argv(assets, tmp_path, 'gate', *_kd(assets))
    assert train_kd.main(argv + ['--teacher-min-top1', '99.5']) == 2
    m = re.search(r"teacher 'scalekd_demo_vit' reaches top-1 ([\d.]+) on the validation split, below "
                  r"--teacher-min-top1 99.5", caplog.text)
    assert m and float(m.group(1)) < 99.5
    assert not os.path.exists(tmp_path / 'gate' / 'last.pth.tar')
    assert train_kd.main(argv + ['--teacher-min-top1', '0', '--experiment', 'gate_ok']) == 0


# --- bad input: one clear message each ----------------------------------------------------------------------------
def _bad_images(tmp_path):
    data = make_image_folder(tmp_path / 'bad_data', classes=3, per_class=4)
    good = open(os.path.join(data, 'train', 'class1', '0.png'), 'rb').read()
    with open(os.path.join(data, 'train', 'class0', 'garbage.png'), 'wb') as f:
        f.write(b'this is not an image')
    with open(os.path.join(data, 'train', 'class1', 'truncated.png'), 'wb') as f:
        f.write(good[:len(good) // 3])
    return data


def test_unreadable_images_are_skipped_counted_and_named(assets, tmp_path, caplog):
    data = _bad_images(tmp_path)
    assert train_kd.main(_argv(assets, tmp_path, 'bad', data=data)) == 0
    for name in ('class0/garbage.png', 'class1/truncated.png'):
        assert re.search(rf"skipped unreadable image '[^']*{name}'", caplog.text), name
    assert '2 bad image(s) in the train split so far (limit --max-bad-images 100)' in caplog.text


def test_too_many_unreadable_images_stop_the_run(assets, tmp_path, caplog):
    data = _bad_images(tmp_path)
    rc = train_kd.main(_argv(assets, tmp_path, 'bad', '-j', '1', '--max-bad-images', '1', data=data))  # in a worker
    assert rc == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == 'ERROR']
    assert len(errors) == 1  # one line, not the DataLoader worker's traceback
    assert re.fullmatch(r"more than --max-bad-images 1 images of the train split could not be read \(last: "
                        r"'[^']*(garbage|truncated)\.png'; all are named in the log\); repair or remove them, or "
                        r"raise --max-bad-images", errors[0]), errors[0]


def test_missing_and_empty_data_folders(assets, tmp_path, caplog):
    assert train_kd.main(_argv(assets, tmp_path, 'x', data=str(tmp_path / 'nope'))) == 2
    assert f"data folder '{tmp_path / 'nope'}' does not exist; pass --data-dir DIR" in caplog.text
    (tmp_path / 'no_train').mkdir()
    assert train_kd.main(_argv(assets, tmp_path, 'x', data=str(tmp_path / 'no_train'))) == 2
    assert "has no 'train' folder" in caplog.text
    (tmp_path / 'empty' / 'train').mkdir(parents=True)
    assert train_kd.main(_argv(assets, tmp_path, 'x', data=str(tmp_path / 'empty'))) == 2
    assert f"split folder '{tmp_path / 'empty' / 'train'}' is empty" in caplog.text


def test_class_count_mismatch(assets, tmp_path, caplog):
    assert train_kd.main(_argv(assets, tmp_path, 'x', '--num-classes', '5')) == 2
    assert '--num-classes 5 does not match the 3 classes found in' in caplog.text


def test_unknown_model_and_teacher_names(assets, tmp_path, caplog, capsys):
    with pytest.raises(SystemExit) as e:
        train_kd.main(_argv(assets, tmp_path, 'x', '--model', 'resnet_made_up'))
    assert e.value.code == 2 and "unknown --model 'resnet_made_up'" in capsys.readouterr().err
    rc = train_kd.main(_argv(assets, tmp_path, 'x', '--distiller', 'kd', '--teacher', 'vit_made_up'))
    assert rc == 2 and "unknown --teacher 'vit_made_up'" in caplog.text


def test_teacher_checkpoint_that_does_not_fit(assets, tmp_path, caplog):
    path = tmp_path / 'teacher5.pth'
    torch.save({'state_dict': timm.create_model('scalekd_demo_vit', num_classes=5).state_dict()}, path)
    rc = train_kd.main(_argv(assets, tmp_path, 'x', '--distiller', 'kd', '--teacher', 'scalekd_demo_vit',
                             '--teacher-checkpoint', str(path)))
    assert rc == 2  # a head for other classes is named as such (distillers/teacher.py check_teacher_head)
    assert "the teacher's head has 5 classes" in caplog.text and 'the data has 3' in caplog.text
    assert f'--model scalekd_demo_vit --pretrained --pretrained-path {path}' in caplog.text  # the fine-tune command
    state = timm.create_model('scalekd_demo_vit', num_classes=3).state_dict()
    del state['blocks.0.norm1.weight']
    torch.save({'state_dict': state}, path)
    caplog.clear()
    rc = train_kd.main(_argv(assets, tmp_path, 'x', '--distiller', 'kd', '--teacher', 'scalekd_demo_vit',
                             '--teacher-checkpoint', str(path)))
    assert rc == 2  # any other mismatch: the strict load lists the keys
    assert "does not fit --teacher scalekd_demo_vit" in caplog.text and 'blocks.0.norm1.weight' in caplog.text


def test_unwritable_output_folder(assets, tmp_path, caplog):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')  # (as root, permissions do not block writes; a file in the path does)
    assert train_kd.main(_argv(assets, blocker, 'x')) == 2
    assert f"output folder '{blocker / 'x'}' is not writable (Not a directory); pass --output DIR" in caplog.text


@pytest.mark.parametrize('text,message', [
    ('optim: {learning_rate: 0.1}', "unknown key 'learning_rate' in section 'optim'"),
    ('optim: {lr: fast}', "key 'lr' in section 'optim' expects a number, got 'fast'"),
])
def test_recipe_with_a_wrong_key_or_type(assets, tmp_path, capsys, text, message):
    recipe = tmp_path / 'r.yaml'
    recipe.write_text(text)
    with pytest.raises(SystemExit) as e:
        train_kd.main(['--config', str(recipe)] + _argv(assets, tmp_path, 'x'))
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize('extra,message', [
    (['--distiller', 'scalekd'], '--distiller scalekd needs a teacher: pass --teacher NAME'),
    (['--teacher', 'scalekd_demo_vit'], '--teacher is set but --distiller is none'),
    (['--distiller', 'scalekd', '--teacher', 'scalekd_demo_vit', '--layer-decay', '0.7'],
     '--layer-decay is not supported with --distiller scalekd'),
])
def test_incompatible_flags_parser(assets, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        train_kd.main(_argv(assets, tmp_path, 'x', *extra))
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_incompatible_flags_at_start(assets, tmp_path, monkeypatch, caplog):
    assert train_kd.main(_argv(assets, tmp_path, 'x', '--aug-repeats', '3')) == 2
    assert '--aug-repeats 3 needs distributed training' in caplog.text

    def fake_two_ranks(args):  # what torchrun would give, without starting a process group
        args.distributed, args.world_size, args.rank, args.local_rank, args.device = True, 2, 0, 0, 'cpu'
        return torch.device('cpu')

    monkeypatch.setattr(train_kd.utils, 'init_distributed_device', fake_two_ranks)
    assert train_kd.main(_argv(assets, tmp_path, 'x', '--sync-bn')) == 2
    assert '--sync-bn needs GPUs (torch SyncBatchNorm does not run on CPU)' in caplog.text


def test_resume_with_another_recipe_is_refused_unless_forced(assets, tmp_path, caplog):
    assert train_kd.main(_argv(assets, tmp_path, 'r')) == 0
    changed = _argv(assets, tmp_path, 'r', '--epochs', '2', '--resume', 'auto', '--lr', '0.02', '--smoothing', '0')
    assert train_kd.main(changed) == 2
    assert "was saved with different settings (lr: 0.01 -> 0.02, smoothing: 0.1 -> 0.0); resume with the same " \
           "recipe and flags, or pass --resume-force" in caplog.text
    assert len(_rows(tmp_path / 'r')) == 1
    assert train_kd.main(changed + ['--resume-force']) == 0
    assert 'continuing although lr, smoothing changed' in caplog.text
    assert [r['epoch'] for r in _rows(tmp_path / 'r')] == ['0', '1']


def test_resume_of_a_checkpoint_older_than_a_flag(assets, tmp_path, caplog):
    """A checkpoint written before a flag existed resumes while that flag is at its default, and is refused when
    the flag is set to something else (the old run trained with the default behaviour)."""
    assert train_kd.main(_argv(assets, tmp_path, 'old')) == 0
    path = str(tmp_path / 'old' / 'last.pth.tar')
    ckpt = runtime.checkpoint.load_weights_only(path)
    for key in ('dist_beta', 'task_loss_weight'):  # as if written before these flags were added
        del ckpt['run_state']['run_config'][key]
    torch.save(ckpt, path)
    resume = _argv(assets, tmp_path, 'old', '--epochs', '2', '--resume', path)
    assert train_kd.main(resume + ['--dist-beta', '3']) == 2
    assert 'dist_beta: None -> 3.0' in caplog.text
    assert train_kd.main(resume) == 0
    assert [r['epoch'] for r in _rows(tmp_path / 'old')] == ['0', '1']


def test_abort_policy_defers_the_check_to_the_next_flush():
    """--nonfinite abort observes on the device each update and decides at log/save points."""
    from runtime.errors import FatalError
    from runtime.nonfinite import NonFiniteGuard
    guard = NonFiniteGuard('abort')
    ok = {'loss': torch.tensor(1.0), 'loss_kd': torch.tensor(2.0)}
    guard.observe(ok, 3)
    guard.flush()  # all finite: nothing happens
    guard.observe(ok, 4)
    guard.observe({'loss': torch.tensor(float('nan')), 'loss_kd': torch.tensor(float('inf'))}, 5)
    guard.observe(ok, 6)
    with pytest.raises(FatalError, match=r'non-finite loss at update 4-6: loss, loss_kd\.'):
        guard.flush()
    guard.flush()  # the flags were consumed
