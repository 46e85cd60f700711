"""What keeps a long run alive: atomic checkpoints, exact resume, signals, non-finite policy, clear errors.

* ``RunSaver`` is timm's CheckpointSaver writing each file atomically (temp file, fsync, rename)
  and adding what an exact resume needs: RNG states of every rank, the position inside the epoch
  of a recovery checkpoint, the non-finite skip count and the run's settings.
* ``find_resume('auto', dir)`` picks the newest checkpoint in the run folder that loads.
* SIGTERM / SIGUSR1 / SIGINT set a flag; the train loop finishes its step, writes a recovery
  checkpoint and exits with ``EXIT_PREEMPTED`` so a requeue script can tell preemption from failure.
* ``collective_timeout`` bounds every collective, so a dead rank stops the others with an error.
* ``BadImageGuard`` skips unreadable images, names and counts them, and stops the run past a limit.
"""
import argparse
import csv
import errno
import glob
import logging
import os
import random
import re
import shutil
import signal
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from PIL import Image
import torch.distributed as dist

from timm.utils import CheckpointSaver, get_state_dict

_logger = logging.getLogger('train')

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request, a recovery checkpoint was written; requeue me
EXIT_FATAL = 2  # bad input or a run that cannot continue; do not requeue

# settings that may change between a run and its resume without changing what is trained
RESUME_FREE_KEYS = {
    'resume', 'resume_force', 'no_resume_opt', 'workers', 'log_interval', 'recovery_interval', 'checkpoint_hist',
    'output', 'experiment', 'pin_mem', 'device', 'dist_backend', 'config', 'synchronize_step', 'start_epoch',
    'teacher_min_top1', 'teacher_check_batches', 'nonfinite', 'nonfinite_max_skips', 'val_interval', 'epochs',
    'data_dir', 'teacher_checkpoint', 'prefetcher', 'distributed', 'world_size', 'rank', 'local_rank',
    'dist_timeout', 'max_bad_images', 'loss_balance_factor', 'scalekd_allow_degenerate',
}


class FatalError(RuntimeError):
    """A run that must stop with one clear message (no traceback)."""
    exit_code = EXIT_FATAL


def log_startup_error(logger, e: Exception) -> None:
    msg = str(e)
    if 'Original Traceback' in msg:  # raised in a DataLoader worker: keep the message, drop the traceback
        msg = msg.rstrip().splitlines()[-1].split('FatalError: ', 1)[-1]
    logger.error(msg)  # timm's console formatter prints it as 'ERROR: <msg>'


# --- input checks ------------------------------------------------------------------------------
def check_data_dir(data_dir: str, splits=()) -> None:
    if not data_dir or not os.path.isdir(data_dir):
        raise FatalError(f"data folder '{data_dir}' does not exist; pass --data-dir DIR, an ImageFolder root with "
                         f"train/ and validation/ (or val/) class folders (tools/prepare_fashion_mnist.py makes one)")
    for split in splits:
        candidates = [os.path.join(data_dir, split)] + ([os.path.join(data_dir, 'val')] if split == 'validation' else [])
        found = [c for c in candidates if os.path.isdir(c)]
        if not found:
            raise FatalError(f"data folder '{data_dir}' has no '{split}' folder; expected {candidates[0]}/<class>/<img>")
        if not any(os.scandir(found[0])):
            raise FatalError(f"split folder '{found[0]}' is empty; it needs one sub-folder of images per class")


def check_output_dir(output_dir: str) -> None:
    probe = os.path.join(output_dir, '.write_test')
    try:
        os.makedirs(output_dir, exist_ok=True)
        with open(probe, 'w') as f:
            f.write('ok')
        os.remove(probe)
    except OSError as e:
        raise FatalError(f"output folder '{output_dir}' is not writable ({e.strerror}); pass --output DIR "
                         f"on a writable disk") from None


# --- RNG state -----------------------------------------------------------------------------------
def get_rng_state() -> Dict[str, Any]:
    state = {
        'python': random.getstate(),
        'numpy': np.random.get_state(),
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _rng_to_tensors(state):
    """Store RNG state with plain types + tensors so that weights_only loading accepts it."""
    py = state['python']
    npst = state['numpy']
    out = {
        'python': [py[0], list(py[1]), py[2]],
        'numpy': [npst[0], torch.from_numpy(npst[1].astype(np.int64)), int(npst[2]), int(npst[3]), float(npst[4])],
        'torch': state['torch'],
    }
    if 'cuda' in state:
        out['cuda'] = list(state['cuda'])
    return out


def _rng_from_tensors(saved):
    py = saved['python']
    npst = saved['numpy']
    state = {
        'python': (py[0], tuple(py[1]), py[2]),
        'numpy': (npst[0], npst[1].numpy().astype(np.uint32), npst[2], npst[3], npst[4]),
        'torch': saved['torch'],
    }
    if 'cuda' in saved:
        state['cuda'] = saved['cuda']
    return state


def capture_rng_state(state: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """``state`` (default: this process's RNG state now) in the form a checkpoint stores (plain types + tensors)."""
    return _rng_to_tensors(state if state is not None else get_rng_state())


def gather_rng_states(distributed: bool, state: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """``state`` (default: the current RNG state) of every rank (collective: every rank must call it)."""
    own = state if state is not None else capture_rng_state()
    if not distributed:
        return [own]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, own)
    return out


# --- distributed setup -------------------------------------------------------------------------------
@contextmanager
def collective_timeout(seconds: Optional[float]):
    """Give the process group that timm's ``init_distributed_device`` creates a collective timeout.

    Any collective that waits longer (a rank died, hangs or lost its network) raises on the ranks
    still alive instead of blocking forever; torchrun then stops the launch with a non-zero code.
    """
    if not seconds:
        yield
        return
    original = dist.init_process_group

    def init_process_group(*args, **kwargs):
        kwargs.setdefault('timeout', timedelta(seconds=float(seconds)))
        return original(*args, **kwargs)

    dist.init_process_group = init_process_group
    try:
        yield
    finally:
        dist.init_process_group = original


_PEER_FAILURE = ('Timed out', 'timed out', 'Connection closed by peer', 'Connection reset by peer',
                 'Broken pipe', 'NCCL communicator was aborted', 'ProcessGroupNCCL')


def collective_failure_message(e: BaseException, rank: int, timeout: Optional[float]) -> Optional[str]:
    """One clear line for a collective that failed because another rank died or hung, else None."""
    backend_error = getattr(dist, 'DistBackendError', ())
    text = str(e)
    if not (isinstance(e, backend_error) or (isinstance(e, RuntimeError) and any(s in text for s in _PEER_FAILURE))):
        return None
    detail = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    detail = re.sub(r'^\[[^\]]*\]\s*', '', detail)[:200]  # drop the "[.../pair.cc:561]" source prefix
    return (f'rank {rank}: a collective failed because another rank died or stopped responding ({detail}; '
            f'--dist-timeout {timeout:g}s). The first failing rank\'s log has the cause; after fixing it, '
            f'restart the launch with --resume auto')


# --- checkpoints -----------------------------------------------------------------------------------
def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or '.', os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_error(path: str, e: Exception) -> FatalError:
    # torch.save turns the OSError of a failed write (ENOSPC, EDQUOT, EIO) into a RuntimeError
    cause = e if isinstance(e, OSError) else e.__context__ if isinstance(e.__context__, OSError) else None
    reason = (cause.strerror or str(cause)) if cause is not None else str(e).splitlines()[0][:200]
    hint = 'Free disk space or pass --output on another disk' if cause is not None and cause.errno in (
        errno.ENOSPC, errno.EDQUOT) else 'Check the output disk'
    return FatalError(f"could not write checkpoint '{path}' ({reason}); the previous checkpoints are untouched. "
                      f"{hint}, then restart with --resume auto")


def _atomic_torch_save(obj, path: str) -> None:
    """Write ``path`` so that a crash at any moment leaves either the old file or the complete new one."""
    tmp = f'{path}.partial.{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path)
    except (OSError, RuntimeError) as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise _write_error(path, e) from None


def _atomic_copy(src: str, dst: str) -> None:
    tmp = f'{dst}.partial.{os.getpid()}'
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
        _fsync_dir(dst)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise _write_error(dst, e) from None


_RECOVERY_RE = re.compile(r'recovery-(\d+)-(\d+)\.pth\.tar$')


class RunSaver(CheckpointSaver):
    """timm's CheckpointSaver with atomic writes and exact-resume state.

    Every file is written under a temporary name, fsynced and renamed (``tmp``/``recovery_tmp``
    go through ``_atomic_torch_save`` before timm's rename; ``last``/``model_best``/``checkpoint-N``
    copies are hardlinks or atomic copies), and the folder is fsynced after each rename.
    Leftover ``*.partial.*`` files of a killed writer are removed at start. Once an epoch
    checkpoint is saved, the recovery files of that epoch and earlier are deleted (the epoch
    checkpoint supersedes them), so restarts do not pile up recovery files.

    The loop sets ``rng_states`` (all ranks) and ``extra_state`` before each save.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rng_states: Optional[List[Dict[str, Any]]] = None
        self.extra_state: Dict[str, Any] = {}
        self.extras_fn = None
        self._batch_idx = None
        for d in {self.checkpoint_dir, self.recovery_dir}:
            for f in glob.glob(os.path.join(d, '*.partial.*')):
                try:
                    os.remove(f)
                    _logger.info(f"Removed the incomplete file '{f}' of an interrupted save")
                except OSError:
                    pass

    def _replace(self, src, dst):
        super()._replace(src, dst)
        _fsync_dir(dst)

    def _duplicate(self, src, dst):
        if self.can_hardlink:
            try:
                if os.path.exists(dst):
                    os.unlink(dst)
                os.link(src, dst)
                _fsync_dir(dst)
                return
            except (OSError, NotImplementedError):
                self.can_hardlink = False
        _atomic_copy(src, dst)

    def _save(self, save_path, epoch, metric=None):
        state = {'epoch': epoch, 'arch': self.args.model if self.args is not None else '',
                 'optimizer': self.optimizer.state_dict(), 'version': 2}
        if self.args is not None:
            state['args'] = self.args
        if self.amp_scaler is not None:
            state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        if self.task is not None:
            state.update(self.task.get_checkpoint_state(unwrap_fn=self.unwrap_fn))
            state.update(self.task.get_checkpoint_state(ema=True, unwrap_fn=self.unwrap_fn))
        else:
            state['state_dict'] = get_state_dict(self.model, self.unwrap_fn)
        if metric is not None:
            state['metric'] = metric
        state['saver'] = self.state_dict(epoch, metric)
        extras = dict(self.extra_state)
        extras['batch_idx'] = self._batch_idx
        if self.rng_states is not None:
            extras['rng'] = self.rng_states
        if self.extras_fn is not None:
            extras.update(self.extras_fn())
        state['run_state'] = extras
        _atomic_torch_save(state, save_path)

    def save_checkpoint(self, epoch, metric=None):
        self._batch_idx = None
        self.rng_states = None  # mid-epoch state only
        for k in ('rng_prev', 'epoch_sums'):
            self.extra_state.pop(k, None)
        result = super().save_checkpoint(epoch, metric)
        self.prune_recovery(epoch)
        return result

    def save_recovery(self, epoch, batch_idx=0):
        self._batch_idx = batch_idx
        try:
            super().save_recovery(epoch, batch_idx)
        finally:
            self._batch_idx = None

    def prune_recovery(self, epoch: int) -> None:
        """Delete recovery files of ``epoch`` and earlier (superseded by the epoch checkpoint)."""
        for f in glob.glob(os.path.join(self.recovery_dir, f'{self.recovery_prefix}-*{self.extension}')):
            m = _RECOVERY_RE.search(os.path.basename(f))
            if m and int(m.group(1)) <= epoch:
                try:
                    os.remove(f)
                except OSError as e:
                    _logger.warning(f"could not remove the old recovery checkpoint '{f}': {e}")
        for attr in ('curr_recovery_file', 'prev_recovery_file'):
            if not os.path.exists(getattr(self, attr) or ''):
                setattr(self, attr, '')

    def adopt_recovery(self, path: str) -> None:
        """After resuming from a recovery file of this folder, let the normal rotation delete it later."""
        if _RECOVERY_RE.search(os.path.basename(path)):
            self.curr_recovery_file = path


def _load(path, mmap: bool = False):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)


def _checkpoint_position(path: str):
    """(epoch, batch) a checkpoint file reaches, read from its metadata; None if it does not load.

    Epoch-end checkpoints sort after every recovery file of their epoch (batch = inf).
    """
    try:
        ckpt = _load(path, mmap=True)  # memory mapped: cheap even for large files
    except Exception:
        return None
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt or 'epoch' not in ckpt:
        return None
    batch = (ckpt.get('run_state') or {}).get('batch_idx')
    return int(ckpt['epoch']), float('inf') if batch is None else int(batch)


def is_valid_checkpoint(path: str) -> bool:
    """True when ``path`` loads completely (weights_only) and looks like a training checkpoint."""
    try:
        ckpt = _load(path)
    except Exception:
        return False
    return isinstance(ckpt, dict) and 'state_dict' in ckpt and 'epoch' in ckpt


def find_resume(resume: str, output_dir: str) -> str:
    """``--resume PATH`` as given, or for 'auto' the newest checkpoint in ``output_dir`` that loads.

    'auto' ignores temporary and partial files (``tmp``, ``recovery_tmp``, ``*.partial.*``) and any
    file that does not load (truncated, corrupt); it returns '' when the folder holds no usable
    checkpoint (a new run).
    """
    if resume != 'auto':
        if not os.path.isfile(resume):
            raise FatalError(f"--resume checkpoint '{resume}' does not exist; pass a .pth.tar of this project "
                             f"or --resume auto with the run's --output/--experiment")
        return resume
    files = [f for f in glob.glob(os.path.join(output_dir, '*.pth.tar'))
             if not os.path.basename(f).startswith(('tmp', 'recovery_tmp'))]
    candidates = []
    for f in files:
        pos = _checkpoint_position(f)
        if pos is None:
            _logger.warning(f"--resume auto: ignoring '{f}' (incomplete or unreadable)")
            continue
        # equal positions (last, checkpoint-N and model_best of one epoch are often one hardlinked
        # file): prefer last, then checkpoint-N, then model_best
        pref = {'last.pth.tar': 2, 'model_best.pth.tar': 0}.get(os.path.basename(f), 1)
        candidates.append((pos, pref, os.path.getmtime(f), f))
    # newest first; a full load confirms the choice (a file can be readable in its index but damaged)
    for *_, f in sorted(candidates, reverse=True):
        if is_valid_checkpoint(f):
            _logger.info(f"--resume auto: resuming from '{f}'")
            return f
        _logger.warning(f"--resume auto: ignoring '{f}' (damaged)")
    _logger.info(f"--resume auto: no usable checkpoint in '{output_dir}', starting a new run")
    return ''


def truncate_summary(path: str, first_epoch: int) -> int:
    """Drop summary.csv rows of epochs >= ``first_epoch``; returns how many were dropped.

    A run killed after writing an epoch's row but before its checkpoint was complete redoes that
    epoch on resume; without this the epoch would appear twice.
    """
    if not os.path.isfile(path):
        return 0
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    if not rows:
        return 0
    keep = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) < first_epoch]
    dropped = len(rows) - len(keep)
    if dropped:
        tmp = f'{path}.partial.{os.getpid()}'
        with open(tmp, 'w', newline='') as f:
            csv.writer(f).writerows(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _logger.info(f"Removed {dropped} row(s) of epoch {first_epoch} and later from '{path}' (written before "
                     f"the run stopped; those epochs are trained again)")
    return dropped


def check_same_resume(path: str, distributed: bool) -> None:
    """Every rank must resume from the same file (collective): a run folder that only some nodes see
    would otherwise start those ranks fresh while the others resume."""
    if not distributed:
        return
    paths = [None] * dist.get_world_size()
    dist.all_gather_object(paths, path)
    odd = next((r for r, p in enumerate(paths) if p != paths[0]), None)
    if odd is not None:
        raise FatalError(f"ranks disagree on the checkpoint to resume (rank 0: '{paths[0] or 'none'}', rank {odd}: "
                         f"'{paths[odd] or 'none'}'); put --output on a filesystem every node shares, or pass "
                         f"--resume PATH readable by every node")


def run_config(args) -> Dict[str, Any]:
    """The settings that define what a run trains (compared on resume)."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in RESUME_FREE_KEYS}


def load_state_extras(path: str, args, force: bool = False) -> Dict[str, Any]:
    """Exact-resume state of a checkpoint; refuses a resume under different settings unless forced.

    ``rng`` / ``rng_prev`` come back as this rank's states (None when the checkpoint was written
    by a run with fewer ranks).
    """
    ckpt = _load(path)
    extras = dict(ckpt.get('run_state') or {})
    extras['epoch'] = ckpt.get('epoch', 0)
    saved = extras.get('run_config')
    if saved is not None:
        now = run_config(args)
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if diff and not force:
            shown = ', '.join(f'{k}: {saved.get(k)!r} -> {now.get(k)!r}' for k in diff[:10])
            more = f' and {len(diff) - 10} more' if len(diff) > 10 else ''
            raise FatalError(f"--resume '{path}' was saved with different settings ({shown}{more}); resume with "
                             f"the same recipe and flags, or pass --resume-force to continue anyway")
        if diff:
            _logger.warning(f'--resume-force: continuing although {", ".join(diff)} changed')
    rank = getattr(args, 'rank', 0)
    saved_ranks = len(extras.get('rng') or [])
    if extras.get('batch_idx') is not None and saved_ranks and saved_ranks != getattr(args, 'world_size', 1):
        _logger.warning(f"'{path}' was written mid-epoch by {saved_ranks} process(es), resumed by "
                        f"{getattr(args, 'world_size', 1)}: the rest of the epoch sees another split of the data "
                        f"(not an exact resume). Resume with the same process count, or from an epoch checkpoint")
    for key in ('rng', 'rng_prev'):
        states = extras.get(key)
        if states is not None:
            own = states[rank] if rank < len(states) else None
            extras[key] = _rng_from_tensors(own) if own is not None else None
    return extras


# --- signals -------------------------------------------------------------------------------------------
_STOP = {'signal': None, 'time': 0.0}
# one stop often arrives twice: Ctrl-C reaches the workers from the terminal and again from torchrun,
# scancel signals every process of the job and torchrun forwards it too
_REPEAT_WINDOW_S = 2.0


def _handler(signum, frame):
    now = time.monotonic()
    if _STOP['signal'] is not None:
        if signum == signal.SIGINT and now - _STOP['time'] > _REPEAT_WINDOW_S:
            raise KeyboardInterrupt  # a second, later Ctrl-C stops at once (no recovery checkpoint)
        return
    _STOP['signal'], _STOP['time'] = signum, now
    _logger.warning(f'Received {signal.Signals(signum).name}: finishing this step, then saving a recovery '
                    f'checkpoint and exiting with code {EXIT_PREEMPTED} (Ctrl-C again to stop at once)')


def install_signal_handlers():
    """Catch SIGTERM / SIGUSR1 / SIGINT for a graceful stop; returns a function restoring the old handlers."""
    _STOP.update(signal=None, time=0.0)
    sigs = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    previous = {sig: signal.signal(sig, _handler) for sig in sigs}

    def restore():
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    return restore


def stop_signal() -> Optional[int]:
    """The stop signal received since install_signal_handlers(), if any."""
    return _STOP['signal']


def stop_requested(distributed: bool, device) -> bool:
    """True on every rank when any rank received a stop signal (collective when distributed)."""
    flag = _STOP['signal'] is not None
    if not distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


# --- non-finite losses -------------------------------------------------------------------------------------
class NonFiniteGuard:
    """``abort``: stop naming the non-finite term(s); ``skip``: drop the update, abort after ``max_skips``."""

    def __init__(self, policy: str = 'abort', max_skips: int = 10, distributed: bool = False, device=None):
        self.policy = policy
        self.max_skips = max_skips
        self.distributed = distributed
        self.device = device
        self.skipped = 0

    @staticmethod
    def _flags(terms: Dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([(~torch.isfinite(v.detach().float())).any() for v in terms.values()]).float()

    def observe(self, terms: Dict[str, torch.Tensor], step: int) -> None:
        """``abort`` policy: note non-finite terms on the device, without a host sync; ``flush`` decides."""
        flags = self._flags(terms)
        if getattr(self, '_seen', None) is None or self._seen[0] != list(terms):
            self._seen = [list(terms), flags, step, step]
        else:
            self._seen[1] = torch.maximum(self._seen[1], flags)
            self._seen[3] = step

    def flush(self, what: str = 'loss') -> None:
        """Raise (on every rank) if any observed update had a non-finite term; call before saving."""
        seen = getattr(self, '_seen', None)
        self._seen = None
        if seen is not None:
            keys, flags, first, last = seen
            self.check(dict(zip(keys, flags)), f'{first}-{last}' if last != first else first, what, flags=flags)

    def check(self, terms: Dict[str, torch.Tensor], step, what: str = 'loss', flags=None) -> bool:
        """Returns True when the update must be skipped; raises FatalError on abort. Ranks agree."""
        keys = list(terms)
        # one flag per term, one collective and one host sync (not one per term)
        bad = (self._flags(terms) if flags is None else flags).clone()
        own = bad.clone()
        if self.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        flags, own = bad.tolist(), own.tolist()
        if not any(flags):
            return False
        names = sorted(k for k, f, o in zip(keys, flags, own) if o)
        others = sorted(k for k, f, o in zip(keys, flags, own) if f and not o)
        where = ', '.join(names + [f'{k} (on another rank)' for k in others])
        if self.policy == 'abort':
            raise FatalError(f'non-finite {what} at update {step}: {where}. Lower --lr, check the data and the '
                             f'teacher, or pass --nonfinite skip; the last checkpoint is intact')
        self.skipped += 1
        _logger.warning(f'non-finite {what} at update {step} ({where}): update skipped '
                        f'({self.skipped}/{self.max_skips})')
        if self.skipped > self.max_skips:
            raise FatalError(f'more than {self.max_skips} updates had a non-finite {what} (last: {where}); '
                             f'stopping. Raise --nonfinite-max-skips or lower --lr')
        return True


# --- unreadable images ------------------------------------------------------------------------------------
class BadImageGuard(torch.utils.data.Dataset):
    """Wrap a timm ``ImageDataset``: an image that cannot be read or decoded is skipped and named.

    timm's ImageDataset logs only the index of a failing sample and gives up after 10 failures in a
    row; a run over a large folder with a few broken files should instead go on, say which files
    were skipped and stop when there are too many. A skipped sample is replaced by the next
    readable one of the split (so batches keep their size). Counts live in shared memory, one
    slot per loader worker, so the main process and all workers see the total of this process;
    past ``max_bad`` the dataset raises ``FatalError`` and the run stops with one message.
    """
    _SLOTS = 257  # main process + up to 256 loader workers

    def __init__(self, dataset, max_bad: int = 100, split: str = 'train'):
        self.dataset = dataset
        self.max_bad = max_bad
        self.split = split
        self.counts = torch.zeros(self._SLOTS, dtype=torch.int64).share_memory_()

    # create_loader / AugMixDataset set the transform on the dataset they get: forward it
    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value):
        self.dataset.transform = value

    @property
    def target_transform(self):
        return self.dataset.target_transform

    @target_transform.setter
    def target_transform(self, value):
        self.dataset.target_transform = value

    def __getattr__(self, name):
        if name == 'dataset':  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self):
        return len(self.dataset)

    @property
    def bad_count(self) -> int:
        return int(self.counts.sum())

    def _decode(self, index):
        ds = self.dataset
        sample, target, *features = ds.reader[index]
        if ds.load_bytes:
            return sample.read(), target, features
        img = Image.open(sample)
        img.load()  # decode now: a truncated file fails here, not later inside the transforms
        if ds.input_img_mode:
            img = img.convert(ds.input_img_mode)
        return img, target, features

    def _name(self, index) -> str:
        try:
            return self.dataset.filename(index, absolute=True)
        except Exception:
            return f'sample {index}'

    def _record(self, index, e: Exception) -> None:
        info = torch.utils.data.get_worker_info()
        slot = 0 if info is None else 1 + info.id % (self._SLOTS - 1)
        self.counts[slot] += 1
        total = self.bad_count
        name = self._name(index)
        _logger.warning(f"skipped unreadable image '{name}' ({type(e).__name__}: {str(e)[:200]}); "
                        f"{total} bad image(s) in the {self.split} split so far (limit --max-bad-images "
                        f"{self.max_bad})")
        if total > self.max_bad:
            raise FatalError(f"more than --max-bad-images {self.max_bad} images of the {self.split} split could "
                             f"not be read (last: '{name}'; all are named in the log); repair or remove them, or "
                             f"raise --max-bad-images")

    def __getitem__(self, index):
        n = len(self.dataset)
        for attempt in range(n):
            i = (index + attempt) % n
            try:
                img, target, features = self._decode(i)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                self._record(i, e)
                continue
            break
        else:
            raise FatalError(f'no image of the {self.split} split can be read; check the data folder')
        ds = self.dataset
        if ds.transform is not None:
            img = ds.transform(img)
        if target is None:
            target = -1
        elif ds.target_transform is not None:
            target = ds.target_transform(target)
        return (img, target, *features) if ds.additional_features is not None else (img, target)


def guard_bad_images(dataset, max_bad: int, split: str):
    """``dataset`` wrapped in a BadImageGuard when it is an image-file dataset, else unchanged."""
    if dataset is None or not all(hasattr(dataset, a) for a in ('reader', 'load_bytes', 'input_img_mode')):
        return dataset
    return BadImageGuard(dataset, max_bad=max_bad, split=split)
