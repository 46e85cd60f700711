"""distributed_train.sh on CPU (gloo): DDP equivalence, two "nodes" on one machine, a dead rank.

Every launch goes through ./distributed_train.sh (torchrun underneath), one CPU thread per worker.

Equivalence: the trained module is BatchNorm-free (scalekd_demo_mixer student, ScaleKD projectors
with LayerNorm stems) and the data has exactly 2B images, so each epoch is one update over all of
them whatever the sampler order: two processes with batch B must match one process with batch 2B
(same loss, same weights) up to float summation order.
"""
import argparse
import csv
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import timm
import torch

import models  # noqa: F401
from conftest import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, 'distributed_train.sh')
B = 4
EPOCHS = 3


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', PYTHON=sys.executable)
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'NNODES', 'NODE_RANK',
              'RDZV_ENDPOINT', 'TORCH_DIST_TIMEOUT'):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def _losses(run_dir):
    with open(os.path.join(run_dir, 'summary.csv')) as f:
        return [(int(r['epoch']), float(r['train_loss'])) for r in csv.DictReader(f)]


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('dist')
    data = make_image_folder(root / 'data', classes=2, per_class=B, splits=('train',))  # 2B images
    torch.manual_seed(0)
    teacher = timm.create_model('scalekd_demo_vit', num_classes=2)
    torch.save({'state_dict': teacher.state_dict()}, root / 'teacher.pth')
    return root, data, str(root / 'teacher.pth')


def _args(setup, exp, batch, *extra):
    root, data, teacher = setup
    return ['--data-dir', data, '--val-split', '', '--model', 'scalekd_demo_mixer', '--distiller', 'scalekd',
            '--teacher', 'scalekd_demo_vit', '--teacher-checkpoint', teacher, '--scalekd-cap-norm', 'ln',
            # no DC-removed views: normalising maps whose spatial mean was removed amplifies float noise
            '--scalekd-alpha-s3', '0.08', '0', '--scalekd-alpha-s4', '0.08', '0',
            '-b', str(batch), '--epochs', str(EPOCHS), '--lr', '0.05', '--warmup-epochs', '0', '--opt', 'sgd',
            '--no-aug', '--hflip', '0', '--reprob', '0', '--smoothing', '0', '--drop-path', '0', '--mixup', '0',
            '-j', '0', '--seed', '0', '--log-interval', '1', '--output', str(root), '--experiment', exp, *extra]


def _launch(nproc, argv, **env):
    return subprocess.Popen([LAUNCH, str(nproc), *argv], cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=240):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f'launch did not finish in {timeout}s:\n{out[-3000:]}')
    return proc.returncode, out


@pytest.fixture(scope='module')
def single_run(setup):
    """The reference: one process, batch 2B (launched the same way, NUM_PROC=1)."""
    rc, out = _finish(_launch(1, _args(setup, 'one', 2 * B)))
    assert rc == 0, out[-3000:]
    return os.path.join(setup[0], 'one')


def _assert_same_training(run_dir, ref_dir):
    ref, got = _losses(ref_dir), _losses(run_dir)
    assert [e for e, _ in got] == list(range(EPOCHS))  # one row per epoch: rank 0 alone writes
    for (_, a), (_, b) in zip(ref, got):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    a, b = _load(os.path.join(ref_dir, 'last.pth.tar')), _load(os.path.join(run_dir, 'last.pth.tar'))
    for part in ('state_dict', 'task_state'):
        sa = a[part] if part == 'state_dict' else a[part]['caps']
        sb = b[part] if part == 'state_dict' else b[part]['caps']
        assert sa.keys() == sb.keys()  # bare student / projector keys, no DDP 'module.' prefix
        for k in sa:
            # float32 sums in another order: ~1e-7 apart; without gradient averaging it is ~1e-2
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-5, msg=lambda m: f'{part}.{k}: {m}')
    # the runs trained: the weights moved well beyond that tolerance since the first epoch's checkpoint
    first = _load(os.path.join(ref_dir, 'checkpoint-0.pth.tar'))['state_dict']
    assert max((first[k] - a['state_dict'][k]).abs().max().item() for k in first if first[k].is_floating_point()) > 1e-2


def test_two_processes_match_one_process_with_twice_the_batch(setup, single_run):
    rc, out = _finish(_launch(2, _args(setup, 'two', B)))
    assert rc == 0, out[-3000:]
    assert 'Training in distributed mode with 2 processes' in out
    _assert_same_training(os.path.join(setup[0], 'two'), single_run)


def test_two_processes_compiled_after_ddp_match_one_process(setup, single_run):
    """--torchcompile with DDP: DDP wraps the trainable module first, then the task compiles it (dynamo's DDP
    graph split) and the teacher forward; the run trains as the eager single process does."""
    rc, out = _finish(_launch(2, _args(setup, 'two_compiled', B, '--torchcompile', 'aot_eager')))
    assert rc == 0, out[-3000:]
    assert 'Training in distributed mode with 2 processes' in out
    _assert_same_training(os.path.join(setup[0], 'two_compiled'), single_run)


def test_two_nodes_on_one_machine_make_one_run(setup, single_run):
    port = _free_port()
    argv = _args(setup, 'nodes', B)
    nodes = [_launch(1, argv, NNODES=2, NODE_RANK=r, MASTER_ADDR='127.0.0.1', MASTER_PORT=port) for r in (0, 1)]
    results = [_finish(p) for p in nodes]
    for rc, out in results:
        assert rc == 0, out[-3000:]
    assert 'Training in distributed mode with 2 processes' in results[0][1]
    assert 'Train:' in results[0][1] and 'Train:' not in results[1][1]  # node 1 trains but does not log
    run = os.path.join(setup[0], 'nodes')
    assert sorted(os.listdir(run)) == ['args.yaml'] + [f'checkpoint-{e}.pth.tar' for e in range(EPOCHS)] + [
        'curves.png', 'last.pth.tar', 'loss_balance.json', 'summary.csv', 'tb']  # no validation split: no model_best
    assert len(os.listdir(os.path.join(run, 'tb'))) == 1
    _assert_same_training(run, single_run)


def _children(pid):
    out = []
    for p in os.listdir('/proc'):
        if p.isdigit():
            try:
                with open(f'/proc/{p}/stat') as f:
                    if int(f.read().rsplit(')', 1)[1].split()[1]) == pid:
                        out.append(int(p))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _env_of(pid):
    try:
        with open(f'/proc/{pid}/environ', 'rb') as f:
            return dict(kv.split('=', 1) for kv in f.read().decode(errors='replace').split('\0') if '=' in kv)
    except OSError:
        return {}


def _alive(pid):
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


class _Reader(threading.Thread):
    """Collect a launcher's output; ``event`` is set once rank 0 has logged a training step."""

    def __init__(self, proc):
        super().__init__(daemon=True)
        self.proc, self.lines, self.event = proc, [], threading.Event()
        self.start()

    def run(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith('Train:'):
                self.event.set()

    @property
    def text(self):
        return ''.join(self.lines)


def _signal_rank1_and_time(launchers, sig, must_exit, limit=60):
    """Send ``sig`` to the worker with RANK=1 once training runs; seconds until ``must_exit`` have exited."""
    readers = [_Reader(p) for p in launchers]
    workers = {}
    try:
        assert readers[0].event.wait(180), 'training did not start:\n' + readers[0].text[-3000:]
        for p in launchers:
            workers.update({int(_env_of(c).get('RANK', -1)): c for c in _children(p.pid)})
        assert 1 in workers and 0 in workers, workers
        os.kill(workers[1], sig)
        t0 = time.time()
        for p in must_exit:
            try:
                p.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                pytest.fail(f'the launch still runs {limit}s after rank 1 got {sig.name}')
        elapsed = time.time() - t0
        assert not _alive(workers[0]), 'rank 0 outlived its launcher'
        return elapsed, [p.returncode for p in must_exit], readers
    finally:
        if 1 in workers and _alive(workers[1]):
            os.kill(workers[1], signal.SIGKILL)
        for p in launchers:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for r in readers:
            r.join(5)


def test_dead_rank_stops_the_launch(setup):
    """kill -9 of one worker: torchrun stops the other one and exits non-zero."""
    proc = _launch(2, _args(setup, 'dead', B, '--epochs', '500'))
    elapsed, (rc,), (reader,) = _signal_rank1_and_time([proc], signal.SIGKILL, [proc])
    assert rc != 0
    assert elapsed < 60
    assert 'Signal 9 (SIGKILL)' in reader.text or 'exitcode  : -9' in reader.text, reader.text[-3000:]


def test_hung_node_stops_the_other_node_by_the_collective_timeout(setup):
    """Separate launchers (static rendezvous) do not watch each other, and a stopped (SIGSTOP) rank
    keeps its sockets open: only --dist-timeout gets rank 0 out of its all-reduce."""
    port = _free_port()
    argv = _args(setup, 'hung_node', B, '--epochs', '500', '--dist-timeout', '10')
    nodes = [_launch(1, argv, NNODES=2, NODE_RANK=r, MASTER_ADDR='127.0.0.1', MASTER_PORT=port) for r in (0, 1)]
    elapsed, (rc,), readers = _signal_rank1_and_time(nodes, signal.SIGSTOP, [nodes[0]])
    assert rc != 0
    assert 9 < elapsed < 60, elapsed
    assert 'rank 0: a collective failed because another rank died or stopped responding (Timed out' \
        in readers[0].text, readers[0].text[-3000:]


def test_sigterm_to_the_launcher_saves_and_resume_continues_at_the_next_batch(setup, tmp_path):
    """torchrun forwards SIGTERM; the workers finish the step, rank 0 saves every rank's RNG, both exit."""
    data = make_image_folder(tmp_path / 'data', classes=2, per_class=8 * B, splits=('train',))  # 8 updates/epoch
    argv = _args(setup, 'preempt', B, '--data-dir', data, '--epochs', '50')
    proc = _launch(2, argv)
    reader = _Reader(proc)
    try:
        assert reader.event.wait(180), reader.text[-3000:]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(5)
    out = reader.text
    assert proc.returncode != 0
    assert out.count('Received SIGTERM: finishing this step') == 2  # both workers got it
    stopped = re.search(r'Stopped at epoch 0 batch (\d+); recovery checkpoint written', out)
    assert stopped, out[-3000:]
    batch = int(stopped.group(1))
    run = os.path.join(setup[0], 'preempt')
    ckpt = _load(os.path.join(run, f'recovery-0-{batch}.pth.tar'))
    assert ckpt['run_state']['batch_idx'] == batch and len(ckpt['run_state']['rng']) == 2

    rc, out = _finish(_launch(2, argv + ['--epochs', '1', '--resume', 'auto']))  # the last --epochs wins
    assert rc == 0, out[-3000:]
    assert f"resuming from '{run}/recovery-0-{batch}.pth.tar'" in out
    trained = re.findall(r'^Train: 0 \[\s*(\d+)/8', out, re.M)
    assert trained and int(trained[0]) == batch + 1 and int(trained[-1]) == 7, trained
    assert _losses(run)[0][0] == 0 and len(_losses(run)) == 1
    assert not [f for f in os.listdir(run) if f.startswith('recovery')]  # superseded by the epoch checkpoint


# --- tools/slurm_train.sh against stand-ins for srun / scontrol / python ----------------------------------
def _fake_slurm(tmp_path, srun_body):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    log = tmp_path / 'log'
    log.mkdir()
    (bin_dir / 'scontrol').write_text(f"""#!/usr/bin/env bash
case "$1" in
  show) printf 'node-a\\nnode-b\\n' ;;
  requeue) echo "$2" >> {log}/requeue ;;
esac
""")
    (bin_dir / 'srun').write_text(f"""#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
{srun_body}
""")
    (bin_dir / 'python').write_text(f"""#!/usr/bin/env bash
echo "$*" > {log}/node$NODE_RANK
""")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=bin_dir / 'python', SLURM_JOB_NODELIST='node-[a-b]',
               SLURM_NNODES=2, SLURM_JOB_ID=123, SLURM_SUBMIT_DIR=ROOT, GPUS_PER_NODE=8)
    return env, log


def test_slurm_script_maps_slurm_variables_onto_torchrun(tmp_path):
    # srun stand-in: run the task once per node, as SLURM would on each node
    env, log = _fake_slurm(tmp_path, 'for n in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$n "$@" || exit; done')
    rc = subprocess.call(['bash', 'tools/slurm_train.sh', '--config', 'r.yaml', '--experiment', 'e'], cwd=ROOT,
                         env=env, stdout=subprocess.DEVNULL)
    assert rc == 0
    for node in (0, 1):
        cmd = (log / f'node{node}').read_text().split()
        assert cmd[:2] == ['-m', 'torch.distributed.run']
        opts = dict(zip(cmd[2::1], cmd[3::1]))
        assert opts['--nnodes'] == '2' and opts['--nproc-per-node'] == '8' and opts['--node-rank'] == str(node)
        assert opts['--master-addr'] == 'node-a' and opts['--master-port'] == '29500'
        assert 'SIGUSR1' in opts['--signals-to-handle']
        script = cmd.index(os.path.join(ROOT, 'train_kd.py'))
        assert cmd[script + 1:] == ['--config', 'r.yaml', '--experiment', 'e', '--resume', 'auto']
    assert not (log / 'requeue').exists()


def test_slurm_script_forwards_the_time_limit_signal_and_requeues(tmp_path):
    # srun stand-in: runs until SIGTERM, then exits 1 as torchrun does after a signal
    env, log = _fake_slurm(tmp_path, f'trap "echo TERM > {tmp_path}/log/srun_got; exit 1" TERM\n'
                                     f'touch {tmp_path}/log/started\nwhile :; do sleep 0.1; done')
    proc = subprocess.Popen(['bash', 'tools/slurm_train.sh', '--experiment', 'e'], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (log / 'started').exists() and time.time() - t0 < 20:
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 delivers
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert (log / 'srun_got').read_text().strip() == 'TERM'
    assert (log / 'requeue').read_text().split() == ['123']
    assert 'requeueing job 123' in out


def test_nodes_that_see_different_run_folders_refuse_to_resume(setup, single_run, tmp_path):
    """A run folder that is not shared: node 0 finds a checkpoint, node 1 none; both stop, saying why."""
    import shutil
    shutil.copytree(single_run, tmp_path / 'node0' / 'split')
    port = _free_port()
    nodes = []
    for r in (0, 1):
        argv = _args(setup, 'split', B, '--output', str(tmp_path / f'node{r}'), '--resume', 'auto', '--epochs', '4')
        nodes.append(_launch(1, argv, NNODES=2, NODE_RANK=r, MASTER_ADDR='127.0.0.1', MASTER_PORT=port))
    for rc, out in [_finish(p, timeout=120) for p in nodes]:
        assert rc != 0
        assert "ranks disagree on the checkpoint to resume (rank 0: '" in out and "rank 1: 'none'" in out, out[-2000:]
    assert len(_losses(tmp_path / 'node0' / 'split')) == EPOCHS  # nothing was trained
