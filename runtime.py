"""What keeps a long run alive: atomic checkpoints, exact resume, signals, non-finite policy, clear errors.

* ``RunSaver`` is timm's CheckpointSaver writing each file atomically (temp file, fsync, rename)
  and adding what an exact resume needs: RNG states of every rank, the position inside the epoch
  of a recovery checkpoint, the non-finite skip count and the run's settings.
* ``find_resume('auto', dir)`` picks the newest checkpoint in the run folder that loads.
* SIGTERM / SIGUSR1 / SIGINT set a flag; the train loop finishes its step, writes a recovery
  checkpoint and exits with ``EXIT_PREEMPTED`` so a requeue script can tell preemption from failure.
"""
import argparse
import glob
import logging
import os
import random
import re
import signal
from typing import Any, Dict, List, Optional

import numpy as np
import torch
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
}


class FatalError(RuntimeError):
    """A run that must stop with one clear message (no traceback)."""
    exit_code = EXIT_FATAL


def log_startup_error(logger, e: Exception) -> None:
    logger.error(f'ERROR: {e}')


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


def gather_rng_states(distributed: bool) -> List[Dict[str, Any]]:
    """RNG states of all ranks (collective: every rank must call it)."""
    own = _rng_to_tensors(get_rng_state())
    if not distributed:
        return [own]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, own)
    return out


# --- checkpoints -----------------------------------------------------------------------------------
def _atomic_torch_save(obj, path: str) -> None:
    tmp = f'{path}.partial.{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise FatalError(f"could not write checkpoint '{path}' ({e.strerror}); the previous checkpoints are "
                         f"untouched. Free disk space or pass --output on another disk, then --resume auto") from None


class RunSaver(CheckpointSaver):
    """timm's CheckpointSaver with atomic writes and exact-resume state.

    The loop sets ``rng_states`` (all ranks) and ``extra_state`` before each save.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rng_states: Optional[List[Dict[str, Any]]] = None
        self.extra_state: Dict[str, Any] = {}
        self.extras_fn = None
        self._batch_idx = None

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
        return super().save_checkpoint(epoch, metric)

    def save_recovery(self, epoch, batch_idx=0):
        self._batch_idx = batch_idx
        try:
            super().save_recovery(epoch, batch_idx)
        finally:
            self._batch_idx = None


def _load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def is_valid_checkpoint(path: str) -> bool:
    try:
        ckpt = _load(path)
    except Exception:
        return False
    return isinstance(ckpt, dict) and 'state_dict' in ckpt and 'epoch' in ckpt


def _progress(path: str):
    """Sort key: (epoch, batch) a checkpoint file reaches; epoch-end files come after every batch."""
    name = os.path.basename(path)
    m = re.match(r'recovery-(\d+)-(\d+)\.pth\.tar$', name)
    if m:
        return int(m.group(1)), int(m.group(2)), os.path.getmtime(path)
    m = re.match(r'(?:checkpoint|milestone)-(\d+)\.pth\.tar$', name)
    if m:
        return int(m.group(1)), float('inf'), os.path.getmtime(path)
    return -1, -1, os.path.getmtime(path)  # last / model_best: ordered by time only


def find_resume(resume: str, output_dir: str) -> str:
    """``--resume PATH`` as given, or for 'auto' the newest checkpoint in ``output_dir`` that loads."""
    if resume != 'auto':
        if not os.path.isfile(resume):
            raise FatalError(f"--resume checkpoint '{resume}' does not exist; pass a .pth.tar of this project "
                             f"or --resume auto with the run's --output/--experiment")
        return resume
    files = [f for f in glob.glob(os.path.join(output_dir, '*.pth.tar')) if '.partial' not in f
             and not os.path.basename(f).startswith(('tmp', 'recovery_tmp'))]
    # read 'last' first: it is the newest complete epoch, and recovery files after it are newer still
    candidates = []
    for f in files:
        if not is_valid_checkpoint(f):
            _logger.warning(f"--resume auto: skipping '{f}' (incomplete or unreadable)")
            continue
        run_state = _load(f).get('run_state', {}) or {}
        ckpt_epoch = _load(f)['epoch']
        batch = run_state.get('batch_idx')
        candidates.append(((ckpt_epoch, float('inf') if batch is None else batch), f))
    if not candidates:
        _logger.info(f"--resume auto: no checkpoint in '{output_dir}', starting a new run")
        return ''
    candidates.sort(key=lambda c: (c[0], os.path.getmtime(c[1])))
    path = candidates[-1][1]
    _logger.info(f"--resume auto: resuming from '{path}'")
    return path


def run_config(args) -> Dict[str, Any]:
    """The settings that define what a run trains (compared on resume)."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in RESUME_FREE_KEYS}


def load_state_extras(path: str, args, force: bool = False) -> Dict[str, Any]:
    """Exact-resume state of a checkpoint; refuses a resume under different settings unless forced."""
    ckpt = _load(path)
    extras = dict(ckpt.get('run_state') or {})
    extras['epoch'] = ckpt.get('epoch', 0)
    saved = extras.get('run_config')
    if saved is not None:
        now = run_config(args)
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if diff and not force:
            shown = ', '.join(f'{k}: {saved.get(k)!r} -> {now.get(k)!r}' for k in diff[:10])
            raise FatalError(f"--resume '{path}' was saved with different settings ({shown}); resume with the "
                             f"same recipe and flags, or pass --resume-force to continue anyway")
        if diff:
            _logger.warning(f'--resume-force: continuing although {", ".join(diff)} changed')
    rng = extras.get('rng')
    if rng is not None:
        rank = getattr(args, 'rank', 0)
        extras['rng'] = _rng_from_tensors(rng[rank]) if rank < len(rng) else None
    return extras


# --- signals -------------------------------------------------------------------------------------------
_STOP = {'signal': None}


def _handler(signum, frame):
    if _STOP['signal'] is not None and signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C stops at once
    _STOP['signal'] = signum
    _logger.warning(f'Received {signal.Signals(signum).name}: finishing this step, then saving a recovery '
                    f'checkpoint and exiting with code {EXIT_PREEMPTED}')


def install_signal_handlers() -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, _handler)


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

    def check(self, terms: Dict[str, torch.Tensor], step: int, what: str = 'loss') -> bool:
        """Returns True when the update must be skipped; raises FatalError on abort. Ranks agree."""
        names = sorted(k for k, v in terms.items() if not torch.isfinite(v).all())
        bad = torch.tensor([1.0 if names else 0.0], device=self.device)
        if self.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() == 0:
            return False
        where = f"{', '.join(names) or 'on another rank'}"
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
