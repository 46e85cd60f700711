"""Resume: which checkpoint (``--resume auto``), whether it fits the run, where inside its epoch to go on, and the
summary.csv rows it keeps (``truncate_summary``) or widens (``append_summary``)."""
import csv
import glob
import io
import logging
import os
from collections import OrderedDict
from typing import Any, Dict, Iterable, Optional

import torch.distributed as dist

from .checkpoint import atomic_write, load_weights_only
from .errors import FatalError
from .rng import capture_rng_state, gather_rng_states, get_rng_state, rng_from_tensors, set_rng_state

_logger = logging.getLogger('train')


def checkpoint_position(path: str):
    """(epoch, batch) a checkpoint file reaches, read from its metadata; None if it does not load.

    Epoch-end checkpoints sort after every recovery file of their epoch (batch = inf).
    """
    try:
        ckpt = load_weights_only(path, mmap=True)  # memory mapped: cheap even for large files
    except Exception:
        return None
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt or 'epoch' not in ckpt:
        return None
    batch = (ckpt.get('run_state') or {}).get('batch_idx')
    return int(ckpt['epoch']), float('inf') if batch is None else int(batch)


def is_valid_checkpoint(path: str) -> bool:
    """True when ``path`` loads completely (weights_only) and looks like a training checkpoint."""
    try:
        ckpt = load_weights_only(path)
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
        pos = checkpoint_position(f)
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
        text = io.StringIO(newline='')
        csv.writer(text).writerows(keep)
        atomic_write(path, lambda f: f.write(text.getvalue().encode()))
        _logger.info(f"Removed {dropped} row(s) of epoch {first_epoch} and later from '{path}' (written before "
                     f"the run stopped; those epochs are trained again)")
    return dropped


def append_summary(path: str, epoch: int, train_metrics: Dict[str, Any], eval_metrics: Optional[Dict[str, Any]],
                   lr: float) -> None:
    """One summary.csv row in timm's layout (epoch, train_*, eval_*, lr). A header that lacks some of the row's
    columns (a run resumed by a version that reports more) is widened first, atomically; older rows keep those
    cells empty, so every column stays under its name."""
    row = OrderedDict(epoch=epoch)
    row.update(('train_' + k, v) for k, v in train_metrics.items())
    row.update(('eval_' + k, v) for k, v in (eval_metrics or {}).items())
    row['lr'] = lr
    header, rows = None, []
    if os.path.isfile(path) and os.path.getsize(path):
        with open(path, newline='') as f:
            header, *rows = list(csv.reader(f))
    cols = list(row) if header is None else header + [k for k in row if k not in header]
    if header is not None and cols != header:
        text = io.StringIO(newline='')
        csv.writer(text).writerows([cols] + [r + [''] * (len(cols) - len(r)) for r in rows])
        atomic_write(path, lambda f: f.write(text.getvalue().encode()))
        _logger.info(f"'{path}': new column(s) {', '.join(c for c in cols if c not in header)} (earlier rows empty)")
    with open(path, 'a', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=cols, restval='')
        if header is None:
            writer.writeheader()
        writer.writerow(row)


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


def run_config(args, free_keys: Iterable[str]) -> Dict[str, Any]:
    """The settings that define what a run trains (compared on resume): ``args`` but the ``free_keys``."""
    free = set(free_keys)
    return {k: v for k, v in sorted(vars(args).items()) if k not in free}


def load_state_extras(path: str, config: Dict[str, Any], rank: int = 0, world_size: int = 1,
                      force: bool = False, defaults: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Exact-resume state of a checkpoint; refuses a resume under different settings unless forced.

    A setting the checkpoint does not record and that is at its ``defaults`` value now is a flag added
    after the checkpoint was written, with the behaviour it had then: not a difference.

    ``rng`` / ``rng_prev`` come back as this rank's states (None when the checkpoint was written
    by a run with fewer ranks).
    """
    ckpt = load_weights_only(path)
    extras = dict(ckpt.get('run_state') or {})
    extras['epoch'] = ckpt.get('epoch', 0)
    saved = extras.get('run_config')
    if saved is not None:
        now = config
        defaults = defaults or {}
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k)
                      and not (k not in saved and k in defaults and now.get(k) == defaults[k]))
        if diff and not force:
            shown = ', '.join(f'{k}: {saved.get(k)!r} -> {now.get(k)!r}' for k in diff[:10])
            more = f' and {len(diff) - 10} more' if len(diff) > 10 else ''
            raise FatalError(f"--resume '{path}' was saved with different settings ({shown}{more}); resume with "
                             f"the same recipe and flags, or pass --resume-force to continue anyway")
        if diff:
            _logger.warning(f'--resume-force: continuing although {", ".join(diff)} changed')
    saved_ranks = len(extras.get('rng') or [])
    if extras.get('batch_idx') is not None and saved_ranks and saved_ranks != world_size:
        _logger.warning(f"'{path}' was written mid-epoch by {saved_ranks} process(es), resumed by "
                        f"{world_size}: the rest of the epoch sees another split of the data "
                        f"(not an exact resume). Resume with the same process count, or from an epoch checkpoint")
    for key in ('rng', 'rng_prev'):
        states = extras.get(key)
        if states is not None:
            own = states[rank] if rank < len(states) else None
            extras[key] = rng_from_tensors(own, rank) if own is not None else None
    return extras


class EpochPosition:
    """Where the train loop stands in its epoch, for an exact mid-epoch resume.

    Resumed from a recovery checkpoint (``saved`` = its run state, ``start_batch`` = the next
    unseen batch), ``skip(batch_idx)`` draws the batches trained before the stop without training
    them and puts the RNG back to the saved states before each of the loader's next two fetches
    (timm's prefetcher loads one batch ahead), so training continues bitwise as if never stopped.
    ``batch_done()`` after each batch keeps the RNG state a recovery checkpoint needs as "previous".
    """

    def __init__(self, start_batch: int = 0, saved: Optional[Dict[str, Any]] = None):
        self.start_batch = start_batch
        self.saved = saved or {}
        self.rng_prev = None  # RNG state at the end of the previous batch (before the loader's next fetch)

    def next_epoch(self) -> None:
        """The next epoch starts at its first batch, with no saved state."""
        self.start_batch, self.saved, self.rng_prev = 0, {}, None

    def skip(self, batch_idx: int) -> bool:
        """True for a batch trained before the stop (drawn, not trained); replays the saved RNG states."""
        if batch_idx >= self.start_batch:
            return False
        if batch_idx == self.start_batch - 2 and self.saved.get('rng_prev') is not None:
            set_rng_state(self.saved['rng_prev'])
        elif batch_idx == self.start_batch - 1 and self.saved.get('rng') is not None:
            set_rng_state(self.saved['rng'])
            self.rng_prev = self.saved['rng']  # the next recovery checkpoint needs it as its previous state
        return True

    def batch_done(self) -> None:
        self.rng_prev = get_rng_state()

    def rng_states(self, distributed: bool) -> Dict[str, Any]:
        """``rng`` (now) and ``rng_prev`` of every rank, for a recovery checkpoint (collective)."""
        rng = gather_rng_states(distributed)
        rng_prev = gather_rng_states(distributed, capture_rng_state(self.rng_prev) if self.rng_prev else None)
        return {'rng': rng, 'rng_prev': rng_prev}
