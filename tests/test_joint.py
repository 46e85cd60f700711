"""Joint runs (joint.py): --model A,B --distiller x,y trains every student from one teacher forward per batch, each
student equal to its solo run, in its own sub-folder; a student whose loss goes non-finite stops alone; a stopped
joint run resumes every student bit for bit; two processes train as one."""
import argparse
import csv
import glob
import hashlib
import logging
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import models  # noqa: F401
import train_kd
import validate
from conftest import make_image_folder
from distillers.logit import KDTask
from distillers.scalekd import ScaleKDTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBS = ('scalekd_demo_resnet-scalekd', 'scalekd_demo_resnet-kd')


def _load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def _rows(run_dir):
    with open(os.path.join(run_dir, 'summary.csv')) as f:
        return list(csv.DictReader(f))


def _hash(state):
    h = hashlib.sha256()
    for k, v in state.items():
        h.update(k.encode())
        h.update(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _argv(data, teacher, out, exp, *extra):
    return ['--data-dir', data, '-b', '6', '--epochs', '2', '-j', '0', '--lr', '0.01', '--warmup-epochs', '0',
            '--log-interval', '1', '--teacher', 'scalekd_demo_vit', '--teacher-checkpoint', teacher, '--model-ema',
            '--no-plot', '--output', str(out), '--experiment', exp, *extra]


def _record(monkeypatch):
    """Every loss term of every forward of the ScaleKD and KD tasks, per task class, in call order."""
    calls = {'scalekd': [], 'kd': []}
    for name, cls in (('scalekd', ScaleKDTask), ('kd', KDTask)):
        orig = cls.forward

        def forward(self, input, target, _orig=orig, _name=name):
            out = _orig(self, input, target)
            calls[_name].append({k: v.item() for k, v in out.items() if k.startswith('loss')})
            return out
        monkeypatch.setattr(cls, 'forward', forward)
    return calls


def test_joint_run_equals_the_solo_runs(image_folder, teacher_ckpt, tmp_path, one_thread, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    calls = _record(monkeypatch)
    assert train_kd.main(_argv(image_folder, teacher_ckpt, tmp_path, 'joint', '--model',
                               'scalekd_demo_resnet,scalekd_demo_resnet', '--distiller', 'scalekd,kd')) == 0
    joint = {k: list(v) for k, v in calls.items()}
    # one teacher forward per batch for the two students: 2 updates per epoch (12 images, batch 6); in epoch 0 the
    # loss-balance pass of each student on the first batch reuses it too
    logged = '\n'.join(r.getMessage() for r in caplog.records)
    assert re.findall(r'Epoch \d: the teacher ran (\d+) times for (\d+) student steps', logged) == [('2', '6'),
                                                                                                   ('2', '4')]
    for v in calls.values():
        v.clear()
    for distiller in ('scalekd', 'kd'):
        assert train_kd.main(_argv(image_folder, teacher_ckpt, tmp_path, f'solo-{distiller}', '--model',
                                   'scalekd_demo_resnet', '--distiller', distiller)) == 0
    for distiller, sub in zip(('scalekd', 'kd'), SUBS):
        # every loss term of every step (the loss-balance pass, then 4 updates), bit for bit
        assert joint[distiller] == calls[distiller] and len(calls[distiller]) == 5
        a, b = _load(tmp_path / f'solo-{distiller}' / 'last.pth.tar'), _load(tmp_path / 'joint' / sub / 'last.pth.tar')
        for key in ('state_dict', 'state_dict_ema'):
            assert _hash(a[key]) == _hash(b[key]), (distiller, key)
        if distiller == 'scalekd':
            assert _hash(a['task_state']['caps']) == _hash(b['task_state']['caps'])
        cols = lambda rows: [{k: v for k, v in r.items() if k.startswith(('train_loss', 'eval_'))} for r in rows]
        assert cols(_rows(tmp_path / 'joint' / sub)) == cols(_rows(tmp_path / f'solo-{distiller}'))
        # laid out as a solo run: validate.py and export.py take the sub-folder's checkpoint unchanged
        run = tmp_path / 'joint' / sub
        assert {'args.yaml', 'summary.csv', 'last.pth.tar', 'model_best.pth.tar'} <= set(os.listdir(run))
        assert glob.glob(str(run / 'tb' / 'events.out.tfevents.*'))
    got = validate.validate_main(['--data-dir', image_folder, '-j', '0', '-b', '6', '--device', 'cpu',
                                  '--checkpoint', str(tmp_path / 'joint' / SUBS[1] / 'last.pth.tar')])
    assert got['top1'] == pytest.approx(float(_rows(tmp_path / 'joint' / SUBS[1])[-1]['eval_top1']), abs=1e-3)


def test_student_lists_recipes_and_sub_folders(image_folder, teacher_ckpt, tmp_path, one_thread, capsys, caplog):
    recipe = tmp_path / 'r.yaml'
    recipe.write_text('model: {model: [scalekd_demo_resnet, scalekd_demo_resnet, scalekd_demo_mixer]}\n'
                      'distill: {distiller: [kd, none, kd]}\n')
    argv = _argv(image_folder, teacher_ckpt, tmp_path, 'ladder', '--config', str(recipe), '--epochs', '1',
                 '--dry-run')
    caplog.set_level(logging.INFO)
    assert train_kd.main(argv) == 0
    assert not (tmp_path / 'ladder').exists()  # a dry run writes nothing
    # each student's own step time with its teacher in every step, then whole joint steps with the teacher once each
    assert caplog.text.count('Student scalekd_demo_resnet-kd (alone, its teacher in every step):') == 1
    assert re.search(r'Joint dry run: 3 students, one joint step \(the teacher once, then every student\) '
                     r'[\d.]+, [\d.]+ s .*img/s per student; the teacher ran 2 times in 2 joint steps', caplog.text)
    assert train_kd.main(argv[:-1]) == 0
    assert sorted(os.listdir(tmp_path / 'ladder')) == ['scalekd_demo_mixer-kd', 'scalekd_demo_resnet-kd',
                                                       'scalekd_demo_resnet-none']
    assert 'train_loss_kd' not in _rows(tmp_path / 'ladder' / 'scalekd_demo_resnet-none')[0]
    # the same command again, without --resume: refused, every student's files untouched
    before = {p: open(p, 'rb').read() for p in glob.glob(str(tmp_path / 'ladder' / '*' / '*.*'))}
    assert train_kd.main(argv[:-1]) == 2
    assert before == {p: open(p, 'rb').read() for p in glob.glob(str(tmp_path / 'ladder' / '*' / '*.*'))}
    assert "already holds a run" in caplog.text and 'scalekd_demo_resnet-kd' in caplog.text
    # a pair that repeats gets an index
    from runtime.students import sub_folders
    assert sub_folders([('resnet50d', 'kd'), ('resnet50d', 'kd'), ('resnet50d', 'kd')]) == [
        'resnet50d-kd', 'resnet50d-kd-2', 'resnet50d-kd-3']
    for bad, message in ((['--distiller', 'kd,dist'], 'names 2 distillers for 3 students'),
                         (['--distiller', 'kd,fitnet,kd'], "invalid choice: 'fitnet'"),
                         (['--resume', 'x.pth.tar'], 'pass --resume auto')):
        with pytest.raises(SystemExit) as e:
            train_kd.main(_argv(image_folder, teacher_ckpt, tmp_path, 'bad', '--model',
                                'scalekd_demo_resnet,scalekd_demo_resnet,scalekd_demo_mixer', *bad))
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_nonfinite_student_stops_alone(image_folder, teacher_ckpt, tmp_path, one_thread, monkeypatch, caplog):
    orig = KDTask.forward

    def nan_kd(self, input, target):
        out = orig(self, input, target)
        out['loss_kd'] = out['loss_kd'] * float('nan')
        out['loss'] = out['loss'] + out['loss_kd']
        return out
    monkeypatch.setattr(KDTask, 'forward', nan_kd)
    rc = train_kd.main(_argv(image_folder, teacher_ckpt, tmp_path, 'nan', '--model',
                             'scalekd_demo_resnet,scalekd_demo_resnet', '--distiller', 'scalekd,kd',
                             '--loss-balance-factor', '0'))
    assert rc == 2  # a student stopped: the joint run reports it in its exit code
    logged = '\n'.join(r.getMessage() for r in caplog.records)
    assert 'Student scalekd_demo_resnet-kd stopped, the other students go on: non-finite loss' in logged
    assert 'loss_kd' in logged
    assert [r['epoch'] for r in _rows(tmp_path / 'nan' / SUBS[0])] == ['0', '1']  # ScaleKD trained to the end
    assert not (tmp_path / 'nan' / SUBS[1] / 'last.pth.tar').exists()  # nothing non-finite was saved


# --- subprocess runs: SIGTERM / kill -9 and resume; two processes -------------------------------------------------
@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp('joint')
    data = make_image_folder(root / 'data', classes=3, per_class=4)
    import timm
    torch.manual_seed(0)
    torch.save({'state_dict': timm.create_model('scalekd_demo_vit', num_classes=3).state_dict()}, root / 't.pth')
    return root, data, str(root / 't.pth')


def _cmd(assets, exp, *extra):
    root, data, teacher = assets
    return [sys.executable, os.path.join(ROOT, 'train_kd.py'), '--data-dir', data,
            '--model', 'scalekd_demo_resnet,scalekd_demo_resnet', '--distiller', 'scalekd,kd',
            '--teacher', 'scalekd_demo_vit', '--teacher-checkpoint', teacher, '-b', '4', '--epochs', '2', '-j', '0',
            '--lr', '0.05', '--warmup-epochs', '0', '--sched-on-updates', '--mixup', '0.2', '--drop-path', '0.1',
            '--model-ema', '--seed', '1',
            '--recovery-interval', '1', '--log-interval', '1', '--no-plot', '--output', str(root), '--experiment', exp,
            '--resume', 'auto', *extra]


def _run(cmd, stop_at=None, sig=signal.SIGKILL):
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1')
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines, seen = [], 0
    try:
        for line in proc.stderr:
            lines.append(line)
            if stop_at and line.startswith('Train:'):
                seen += 1
                if seen == stop_at:
                    proc.send_signal(sig)
                    break
        lines.append(proc.stderr.read())
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, ''.join(lines)


def _assert_same(run, ref):
    for sub in SUBS:
        a, b = _load(os.path.join(ref, sub, 'last.pth.tar')), _load(os.path.join(run, sub, 'last.pth.tar'))
        for key in ('state_dict', 'state_dict_ema'):
            assert _hash(a[key]) == _hash(b[key]), (sub, key)
        cols = lambda rows: [{k: v for k, v in r.items() if k.startswith(('train_loss', 'eval_'))} for r in rows]
        assert cols(_rows(os.path.join(run, sub))) == cols(_rows(os.path.join(ref, sub)))


def test_sigterm_and_kill9_resume_every_student_bit_for_bit(assets):
    rc, log = _run(_cmd(assets, 'ref'))
    assert rc == 0, log[-3000:]
    ref = os.path.join(assets[0], 'ref')
    cmd = _cmd(assets, 'stopped', '--recovery-interval', '0')
    rc, log = _run(cmd, stop_at=5, sig=signal.SIGTERM)  # the 3rd update (two students log each update)
    assert rc == 75, log[-3000:]
    m = re.search(r'Stopped at epoch (\d+) batch (\d+); recovery checkpoints written for every student', log)
    assert m, log[-3000:]
    for sub in SUBS:
        assert os.path.isfile(os.path.join(assets[0], 'stopped', sub, f'recovery-{m.group(1)}-{m.group(2)}.pth.tar'))
    rc, log = _run(_cmd(assets, 'stopped'), stop_at=4)  # resumed, then killed mid-epoch (recovery every update)
    assert rc == -signal.SIGKILL, log[-3000:]
    rc, log = _run(_cmd(assets, 'stopped'))
    assert rc == 0, log[-3000:]
    assert log.count('resuming from') >= len(SUBS)
    _assert_same(os.path.join(assets[0], 'stopped'), ref)


def test_two_processes_train_as_one(assets):
    """BatchNorm-free students (Mixer, LayerNorm projector stems), 2B images: one update per epoch over all of them,
    whatever the split; 2 processes at batch B match 1 process at batch 2B up to summation order."""
    import socket
    root, _, teacher = assets
    data = make_image_folder(root / 'data2', classes=2, per_class=4, splits=('train',))
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]

    def launch(n, b, exp):
        t2 = root / 't2.pth'
        if not t2.exists():
            import timm
            torch.manual_seed(0)
            torch.save({'state_dict': timm.create_model('scalekd_demo_vit', num_classes=2).state_dict()}, t2)
        argv = ['--data-dir', data, '--val-split', '', '--model', 'scalekd_demo_mixer,scalekd_demo_mixer',
                '--distiller', 'scalekd,kd', '--teacher', 'scalekd_demo_vit', '--teacher-checkpoint', str(t2),
                '--scalekd-cap-norm', 'ln', '--scalekd-alpha-s3', '0.08', '0', '--scalekd-alpha-s4', '0.08', '0',
                '-b', str(b), '--epochs', '2', '--lr', '0.05', '--warmup-epochs', '0', '--no-aug', '--hflip', '0',
                '--smoothing', '0', '-j', '0', '--seed', '0', '--log-interval', '1', '--no-plot',
                '--output', str(root), '--experiment', exp]
        env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
        env.update(OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', PYTHON=sys.executable, MASTER_PORT=str(port))
        proc = subprocess.run([os.path.join(ROOT, 'distributed_train.sh'), str(n), *argv], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        return os.path.join(root, exp), proc.stdout + proc.stderr
    one, _ = launch(1, 8, 'one')
    two, log = launch(2, 4, 'two')
    assert 'Training in distributed mode with 2 processes' in log
    for sub in ('scalekd_demo_mixer-scalekd', 'scalekd_demo_mixer-kd'):
        ra, rb = _rows(os.path.join(one, sub)), _rows(os.path.join(two, sub))
        assert [float(r['train_loss']) for r in rb] == pytest.approx([float(r['train_loss']) for r in ra], rel=1e-5)
        a, b = _load(os.path.join(one, sub, 'last.pth.tar')), _load(os.path.join(two, sub, 'last.pth.tar'))
        for k in a['state_dict']:
            torch.testing.assert_close(b['state_dict'][k], a['state_dict'][k], rtol=1e-4, atol=1e-5)


def test_students_with_drop_path_draw_their_solo_runs_draws(image_folder, teacher_ckpt, tmp_path, one_thread):
    """Each student steps on its own torch RNG stream (forked where its solo run's first step starts drawing), so
    with loader workers (the data pipeline then draws in the workers, in both runs) a student with drop-path trains
    as its solo run, bit for bit."""
    extra = ('--drop-path', '0.1', '-j', '1', '--epochs', '2', '--loss-balance-factor', '0')
    assert train_kd.main(_argv(image_folder, teacher_ckpt, tmp_path, 'joint', '--model',
                               'scalekd_demo_resnet,scalekd_demo_resnet', '--distiller', 'scalekd,kd', *extra)) == 0
    for distiller, sub in zip(('scalekd', 'kd'), SUBS):
        assert train_kd.main(_argv(image_folder, teacher_ckpt, tmp_path, f'solo-{distiller}', '--model',
                                   'scalekd_demo_resnet', '--distiller', distiller, *extra)) == 0
        a, b = _load(tmp_path / f'solo-{distiller}' / 'last.pth.tar'), _load(tmp_path / 'joint' / sub / 'last.pth.tar')
        assert _hash(a['state_dict']) == _hash(b['state_dict']), distiller
        assert _rows(tmp_path / 'joint' / sub)[-1]['train_loss'] == _rows(tmp_path / f'solo-{distiller}')[-1]['train_loss']
