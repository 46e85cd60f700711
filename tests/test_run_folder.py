"""Issue 22: a run folder is never clobbered: one run per folder, one job per folder (runtime/runlock.py).

A new run (no --resume) on a folder that holds a run stops with exit 2, the message (naming --resume auto and the
next free --experiment) printed last, and every file of the folder byte-for-byte unchanged. run.lock keeps a
second job (two real train_kd.py processes) out of a running folder; a lock whose job died is taken over with a
warning, and a stopped (exit 75) or killed run continues with --resume auto.
"""
import csv
import errno
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import runtime.lockholder as lockholder
import runtime.runlock as runlock
import train_kd
from conftest import make_image_folder
from runtime.errors import FatalError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('rf') / 'data', classes=3, per_class=4)


def _argv(data, out, exp, *extra):
    return ['--data-dir', str(data), '--model', 'scalekd_demo_resnet', '-b', '4', '--epochs', '1', '-j', '0',
            '--lr', '0.01', '--warmup-epochs', '0', '--loss-balance-factor', '0', '--log-interval', '1', '--no-plot',
            '--output', str(out), '--experiment', exp, *extra]


def _snapshot(folder):
    out = {}
    for d, _, files in os.walk(folder):
        out[os.path.relpath(d, folder) + '/'] = ''
        for f in files:
            with open(os.path.join(d, f), 'rb') as fh:
                out[os.path.relpath(os.path.join(d, f), folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _epochs(run):
    with open(os.path.join(run, 'summary.csv')) as f:
        return [r['epoch'] for r in csv.DictReader(f)]


def _last_message(caplog):
    records = [r for r in caplog.records if r.name != 'timm.models._builder']
    return records[-1].levelname, records[-1].getMessage()


def _popen(argv):
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1')
    return subprocess.Popen([sys.executable, os.path.join(ROOT, 'train_kd.py'), *argv], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _until_training(proc):
    """Read ``proc``'s log up to its first training log line (the lock is held, args.yaml written)."""
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith('Train:'):
            return ''.join(lines)
    proc.wait()
    pytest.fail(f'exit {proc.returncode} before training:\n' + ''.join(lines)[-3000:])


def _finish(proc, log=''):
    try:
        rest = proc.communicate(timeout=180)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, log + rest


def _dead_pid():
    p = subprocess.Popen([sys.executable, '-c', 'pass'])
    p.wait()
    return p.pid


def _write_lock(folder, **holder):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, 'run.lock')
    with open(path, 'w') as f:
        json.dump(dict(dict(host=socket.gethostname(), since='2025-01-01T00:00:00', token='old'), **holder), f)
    return path


# --- one run per folder -------------------------------------------------------------------------------------------
def test_a_second_new_run_never_overwrites_the_first(data, tmp_path, caplog):
    run = tmp_path / 'kd3'
    assert train_kd.main(_argv(data, tmp_path, 'kd3')) == 0
    assert not (run / 'run.lock').exists()  # released at the end
    before = _snapshot(run)
    caplog.clear()
    assert train_kd.main(_argv(data, tmp_path, 'kd3', '--lr', '0.02')) == 2  # the same command, another lr
    level, msg = _last_message(caplog)
    assert level == 'ERROR' and msg == (
        f"run folder '{run}' already holds a run (args.yaml, checkpoint-0.pth.tar, last.pth.tar, model_best.pth.tar "
        f"and 1 more); a new run does not write over it. Continue that run with --resume auto, or start a new one "
        f"with --experiment kd3-1 (or another --output)")
    assert _snapshot(run) == before  # every file's bytes, and no lock left behind
    (tmp_path / 'kd3-1').mkdir()  # a name in use is skipped
    caplog.clear()
    assert train_kd.main(_argv(data, tmp_path, 'kd3')) == 2
    assert '--experiment kd3-2 (or another --output)' in _last_message(caplog)[1]
    assert _snapshot(run) == before
    # --resume auto continues in the same folder, as before
    assert train_kd.main(_argv(data, tmp_path, 'kd3', '--epochs', '2', '--resume', 'auto')) == 0
    assert _epochs(run) == ['0', '1'] and not (run / 'run.lock').exists()


def test_a_folder_with_only_tensorboard_or_nothing_is_a_new_run_folder(data, tmp_path):
    (tmp_path / 'empty').mkdir()
    assert runlock.run_files(str(tmp_path / 'empty')) == [] and runlock.run_files(str(tmp_path / 'nope')) == []
    runlock.check_new_run_folder(str(tmp_path / 'empty'))
    (tmp_path / 'tbonly' / 'tb').mkdir(parents=True)
    (tmp_path / 'tbonly' / 'tb' / 'events.out.tfevents.1').write_bytes(b'old events')
    assert train_kd.main(_argv(data, tmp_path, 'tbonly')) == 0
    assert _epochs(tmp_path / 'tbonly') == ['0']
    # any checkpoint, summary.csv or args.yaml makes it a run folder
    for name in ('args.yaml', 'summary.csv', 'recovery-0-3.pth.tar'):
        (tmp_path / name.split('.')[0]).mkdir()
        (tmp_path / name.split('.')[0] / name).write_text('x')
        with pytest.raises(FatalError, match=f"already holds a run \\({name}\\)"):
            runlock.check_new_run_folder(str(tmp_path / name.split('.')[0]))


# --- one job per folder -------------------------------------------------------------------------------------------
def test_a_second_job_on_a_running_folder_stops_naming_the_first(data, tmp_path, caplog):
    """Two real train_kd.py processes on one folder: the first is held (SIGSTOP) inside its first epoch while the
    second starts; the second stops before step 0 naming the first's pid; the first then finishes."""
    argv = _argv(data, tmp_path, 'busy', '--epochs', '2')
    first = _popen(argv)
    try:
        log = _until_training(first)
        first.send_signal(signal.SIGSTOP)
        run = tmp_path / 'busy'
        holder = json.loads((run / 'run.lock').read_text())
        assert holder['pid'] == first.pid and holder['host'] == socket.gethostname() and holder['since']
        before = _snapshot(run)
        second = _popen(argv + ['--resume', 'auto'])  # a requeue script's command, started twice
        rc, out = _finish(second)
        assert rc == 2, out[-3000:]
        last = out.strip().splitlines()[-1]
        assert last.startswith(f"ERROR: run folder '{run}' is in use by another job (host {socket.gethostname()}, "
                               f"pid {first.pid}, since {holder['since']}; last heartbeat"), last
        assert "Wait for it to end or stop it" in last and 'Train:' not in out
        caplog.clear()  # a new run (no --resume) in-process: the same refusal, before the folder check
        assert train_kd.main(argv) == 2
        assert f'pid {first.pid}' in _last_message(caplog)[1]
        assert _snapshot(run) == before
        first.send_signal(signal.SIGCONT)
        rc, log = _finish(first, log)
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
    assert rc == 0, log[-3000:]
    assert _epochs(run) == ['0', '1'] and not (run / 'run.lock').exists()


def test_a_lock_of_a_dead_process_is_taken_over_with_a_warning(data, tmp_path, caplog):
    pid = _dead_pid()
    _write_lock(str(tmp_path / 'dead'), pid=pid)
    assert train_kd.main(_argv(data, tmp_path, 'dead')) == 0
    assert f"took over the stale run lock '{tmp_path / 'dead' / 'run.lock'}' of host {socket.gethostname()}, " \
           f"pid {pid}, since 2025-01-01T00:00:00: its process {pid} is gone" in caplog.text
    assert not (tmp_path / 'dead' / 'run.lock').exists()


def test_lock_rules(tmp_path, caplog):
    folder = str(tmp_path / 'r')
    live = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        # a live process on this host holds it, however old its heartbeat; the same pid with another start time
        # (the pid was reused) does not
        path = _write_lock(folder, pid=live.pid, start=lockholder.proc_stat(live.pid)[1])
        os.utime(path, (0, 0))
        with pytest.raises(FatalError, match=f'is in use by another job \\(host {socket.gethostname()}, pid '
                                             f'{live.pid}'):
            runlock.RunLock(folder).acquire()
        _write_lock(folder, pid=live.pid, start='1')
        lock = runlock.RunLock(folder)
        lock.acquire()
        lock.release()
        assert f'its process {live.pid} is gone' in caplog.text and not os.path.exists(path)
    finally:
        live.kill()
        live.wait()
    # another host: held while its heartbeat is fresh, stale after --lock-stale-minutes
    _write_lock(folder, host='elsewhere', pid=1, job='42')
    with pytest.raises(FatalError, match=r"host elsewhere, pid 1, SLURM job 42, since .*; last heartbeat 0\.0 min "
                                         r"ago\).*stale after --lock-stale-minutes 10 without a heartbeat"):
        runlock.RunLock(folder).acquire()
    os.utime(path, (time.time() - 11 * 60,) * 2)
    lock = runlock.RunLock(folder)
    lock.acquire()
    assert 'no heartbeat for 11.0 min (--lock-stale-minutes 10)' in caplog.text
    lock.release()
    # another host whose heartbeat stopped (3 beats missed) but is not stale yet: waited for, then taken over
    _write_lock(folder, host='elsewhere', pid=1)
    os.utime(path, (time.time() - 1.5,) * 2)
    lock = runlock.RunLock(folder, stale_minutes=0.05)  # 3 s, a beat every 0.3 s
    t0 = time.time()
    lock.acquire()
    assert 1.0 < time.time() - t0 < 10 and 'waiting until it is stale' in caplog.text
    # the holder's heartbeat refreshes the mtime; release removes only its own lock
    os.utime(path, (time.time() - 100,) * 2)
    t0 = time.time()
    while time.time() - os.path.getmtime(path) > 50 and time.time() - t0 < 10:
        time.sleep(0.1)
    assert time.time() - os.path.getmtime(path) < 10
    assert json.loads(open(path).read())['pid'] == os.getpid()
    lock.release()
    assert not os.path.exists(path)



def test_a_failed_read_of_the_lock_keeps_the_heartbeat_beating(tmp_path, caplog, monkeypatch):
    """NFS ESTALE/EIO or too many open files on a read of run.lock: the heartbeat goes on (one warning), and only a
    readable lock naming another holder ends it."""
    caplog.set_level(logging.INFO, logger='train')
    lock = runlock.RunLock(str(tmp_path / 'beat'), stale_minutes=0.02)  # 1.2 s, a beat every 0.12 s
    lock.acquire()
    failed, real_open = [], open

    def flaky_open(file, *args, **kwargs):
        if file == lock.path and len(failed) < 3:
            failed.append(time.time())
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE), file)
        return real_open(file, *args, **kwargs)

    try:
        os.utime(lock.path, (time.time() - 100,) * 2)
        monkeypatch.setattr(runlock, 'open', flaky_open, raising=False)
        t0 = time.time()
        while 'refreshed again after 3 failed beat(s)' not in caplog.text and time.time() - t0 < 10:
            time.sleep(0.05)
        assert len(failed) == 3 and os.path.getmtime(lock.path) > failed[-1] and lock._thread.is_alive()
        assert caplog.text.count('could not read or refresh the run lock') == 1, caplog.text
        assert 'Stale file handle' in caplog.text and 'taken over' not in caplog.text
        # a readable lock of another holder: the heartbeat reports it and stops; release leaves that lock alone
        _write_lock(lock.folder, pid=1, host='elsewhere')
        lock._thread.join(timeout=10)
        assert not lock._thread.is_alive() and "was taken over by host elsewhere, pid 1" in caplog.text
    finally:
        lock.release()
    assert json.loads(open(lock.path).read())['host'] == 'elsewhere'


@pytest.mark.skipif(not os.path.exists('/proc/self/ns/pid'), reason='pid namespaces are Linux only')
def test_a_lock_of_another_pid_namespace_on_this_host_is_judged_by_its_heartbeat(tmp_path, caplog):
    """Two containers on one node (same host name and boot id, separate pid namespaces): the other's pid means
    nothing here, so its lock is held while its heartbeat is fresh and stale only after --lock-stale-minutes."""
    with open('/proc/sys/kernel/random/boot_id') as f:
        boot = f.read().strip()
    folder, host, dead = str(tmp_path / 'ns'), socket.gethostname(), _dead_pid()
    for pid in (dead, os.getpid()):  # not visible here; the same number as this process
        path = _write_lock(folder, pid=pid, start='1', boot=boot, pidns='pid:[1]', job='7')
        with pytest.raises(FatalError, match=f'in use by another job \\(host {host}, pid {pid} \\(another pid '
                                             f'namespace\\), SLURM job 7, since .*; last heartbeat 0\\.0 min ago'):
            runlock.RunLock(folder).acquire()
        assert json.loads(open(path).read())['token'] == 'old'
    os.utime(path, (time.time() - 11 * 60,) * 2)
    lock = runlock.RunLock(folder)
    lock.acquire()
    assert 'no heartbeat for 11.0 min (--lock-stale-minutes 10)' in caplog.text
    assert json.loads(open(path).read())['pidns'] == os.readlink('/proc/self/ns/pid')
    lock.release()
    # the same pid namespace: a pid that is gone is decided at once, as before
    _write_lock(folder, pid=dead, boot=boot, pidns=os.readlink('/proc/self/ns/pid'))
    lock = runlock.RunLock(folder)
    lock.acquire()
    lock.release()
    assert f'its process {dead} is gone' in caplog.text and not os.path.exists(path)

def test_a_stopped_or_killed_run_continues_with_resume_auto(data, tmp_path):
    argv = _argv(data, tmp_path, 'pre', '--epochs', '2', '--resume', 'auto', '--recovery-interval', '1')
    lock = tmp_path / 'pre' / 'run.lock'
    # kill -9: the lock stays, naming a process that is gone; the requeued job takes it over
    first = _popen(argv)
    _until_training(first)
    first.kill()
    first.wait()
    assert json.loads(lock.read_text())['pid'] == first.pid
    # SIGTERM: a recovery checkpoint, exit 75, the lock released
    second = _popen(argv)
    log = _until_training(second)
    second.send_signal(signal.SIGTERM)
    rc, log = _finish(second, log)
    assert rc == 75, log[-3000:]
    assert 'took over the stale run lock' in log and f'its process {first.pid} is gone' in log
    assert not lock.exists()
    rc, log = _finish(_popen(argv))
    assert rc == 0, log[-3000:]
    assert "--resume auto: resuming from" in log and 'run lock' not in log
    assert _epochs(tmp_path / 'pre') == ['0', '1'] and not lock.exists()


def test_every_rank_gets_rank_0s_verdict(data, tmp_path):
    """torchrun, 2 processes: the folder holds a run; both ranks stop with rank 0's message (no rank waits)."""
    run = tmp_path / 'held'
    run.mkdir()
    (run / 'summary.csv').write_text('epoch\n0\n')
    before = _snapshot(run)
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', PYTHON=sys.executable,
               MASTER_PORT=str(_free_port()))
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'NNODES', 'NODE_RANK', 'RDZV_ENDPOINT'):
        env.pop(k, None)
    p = subprocess.run([os.path.join(ROOT, 'distributed_train.sh'), '2', *_argv(data, tmp_path, 'held', '-b', '2')],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert out.count(f"ERROR: run folder '{run}' already holds a run (summary.csv)") == 2, out[-3000:]
    assert _snapshot(run) == before


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]
