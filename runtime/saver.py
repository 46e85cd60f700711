"""``RunSaver``: timm's CheckpointSaver writing every file atomically, plus what an exact resume needs."""
import glob
import logging
import os
import re
from typing import Any, Dict, Optional

from timm.utils import CheckpointSaver, get_state_dict

from .checkpoint import atomic_copy, atomic_torch_save, fsync_dir

_logger = logging.getLogger('train')

RECOVERY_RE = re.compile(r'recovery-(\d+)-(\d+)\.pth\.tar$')


class RunSaver(CheckpointSaver):
    """timm's CheckpointSaver with atomic writes and exact-resume state.

    Every file is written under a temporary name, fsynced and renamed (``tmp``/``recovery_tmp``
    go through ``atomic_torch_save`` before timm's rename; ``last``/``model_best``/``checkpoint-N``
    copies are hardlinks or atomic copies), and the folder is fsynced after each rename.
    Leftover ``*.partial.*`` files of a killed writer are removed at start. Once an epoch
    checkpoint is saved, the recovery files of that epoch and earlier are deleted (the epoch
    checkpoint supersedes them), so restarts do not pile up recovery files.

    Each checkpoint's ``run_state`` holds the ``run_state`` given to ``save_checkpoint`` /
    ``save_recovery``, the position (``batch_idx``: None at an epoch end) and ``run_config``.
    """

    def __init__(self, *args, run_config: Optional[Dict[str, Any]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_config = run_config  # the settings that define the run (compared on resume)
        self._run_state: Dict[str, Any] = {}  # of the save in progress
        for d in {self.checkpoint_dir, self.recovery_dir}:
            for f in glob.glob(os.path.join(d, '*.partial.*')):
                try:
                    os.remove(f)
                    _logger.info(f"Removed the incomplete file '{f}' of an interrupted save")
                except OSError:
                    pass

    def _replace(self, src, dst):
        super()._replace(src, dst)
        fsync_dir(dst)

    def _duplicate(self, src, dst):
        if self.can_hardlink:
            try:
                if os.path.exists(dst):
                    os.unlink(dst)
                os.link(src, dst)
                fsync_dir(dst)
                return
            except (OSError, NotImplementedError):
                self.can_hardlink = False
        atomic_copy(src, dst)

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
        state['run_state'] = dict(self._run_state, run_config=self.run_config)
        atomic_torch_save(state, save_path)

    def save_checkpoint(self, epoch, metric=None, run_state: Optional[Dict[str, Any]] = None):
        """timm's epoch-end save (last, checkpoint-N, model_best) with ``run_state``; prunes older recovery files."""
        self._run_state = dict(run_state or {}, batch_idx=None)
        try:
            result = super().save_checkpoint(epoch, metric)
        finally:
            self._run_state = {}
        self.prune_recovery(epoch)
        return result

    def save_recovery(self, epoch, batch_idx=0, run_state: Optional[Dict[str, Any]] = None):
        """A mid-epoch checkpoint after ``batch_idx``, holding ``run_state`` (RNG states, the epoch's sums, ...)."""
        self._run_state = dict(run_state or {}, batch_idx=batch_idx)
        try:
            super().save_recovery(epoch, batch_idx)
        finally:
            self._run_state = {}

    def prune_recovery(self, epoch: int) -> None:
        """Delete recovery files of ``epoch`` and earlier (superseded by the epoch checkpoint)."""
        for f in glob.glob(os.path.join(self.recovery_dir, f'{self.recovery_prefix}-*{self.extension}')):
            m = RECOVERY_RE.search(os.path.basename(f))
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
        if RECOVERY_RE.search(os.path.basename(path)):
            self.curr_recovery_file = path
