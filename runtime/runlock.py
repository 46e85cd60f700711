"""One run per run folder, one job per run folder.

* ``check_new_run_folder``: a new run (no ``--resume``) refuses a folder holding a run (``run_files``: a checkpoint,
  ``summary.csv`` or ``args.yaml``), naming ``--resume auto`` and the next free ``--experiment``.
* ``RunLock``: ``<run>/run.lock`` (JSON: host, pid, pid namespace, SLURM job, since), created with
  ``O_CREAT|O_EXCL``, held for the whole run, its mtime refreshed by a daemon thread (the heartbeat; a failed read
  is retried at the next beat). Stale, and taken over with a warning: its process is gone (same host and pid
  namespace), or its heartbeat is older than ``--lock-stale-minutes`` (another host or pid namespace; a stopped
  heartbeat is waited for until then, so a job killed with SIGKILL and requeued elsewhere continues by itself).
* ``hold_run_lock`` / ``release_run_lock``: train_kd.py's two calls; rank 0 decides, every rank gets the verdict.
"""
import itertools
import json
import logging
import os
import threading
import time
import uuid
from contextlib import suppress
from datetime import datetime
from typing import Any, List, Optional, Tuple

import torch.distributed as dist

from .errors import FatalError
from .lockholder import BOOT, HOST, PIDNS, describe, is_running, proc_stat, same_pid_namespace

_logger = logging.getLogger('train')

LOCK_NAME = 'run.lock'
RUN_MARKERS = ('summary.csv', 'args.yaml')  # and every *.pth.tar
_held: List['RunLock'] = []  # the locks this process holds (a joint run: one per student; release_run_lock)


def run_files(folder: str) -> list:
    """The files of ``folder`` that show a run was started in it (none for a missing folder or one with only tb/)."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [n for n in names if n in RUN_MARKERS or n.endswith('.pth.tar')]


def next_free_name(folder: str, experiment: str = '') -> str:
    """``<experiment>-N`` for the smallest N >= 1 whose folder does not exist."""
    base = folder.rstrip(os.sep)
    n = next(i for i in itertools.count(1) if not os.path.exists(f'{base}-{i}'))
    return f"{experiment.rstrip(os.sep) or os.path.basename(base)}-{n}"


def check_new_run_folder(folder: str, experiment: str = '') -> None:
    """A new run stops (exit 2) on a folder that holds a run; read-only."""
    found = run_files(folder)
    if found:
        shown = ', '.join(found[:4]) + (f' and {len(found) - 4} more' if len(found) > 4 else '')
        raise FatalError(f"run folder '{folder}' already holds a run ({shown}); a new run does not write over it. "
                         f"Continue that run with --resume auto, or start a new one with --experiment "
                         f"{next_free_name(folder, experiment)} (or another --output)")


class RunLock:
    """``<folder>/run.lock`` for one job: ``acquire()`` (FatalError when another live job holds it), ``release()``."""
    WARN_EVERY_S = 600  # a heartbeat whose reads keep failing warns again after this long

    def __init__(self, folder: str, stale_minutes: float = 10.0):
        self.folder, self.path = folder, os.path.join(folder, LOCK_NAME)
        self.stale_s = float(stale_minutes) * 60.0
        self.interval = min(60.0, self.stale_s / 10)  # heartbeat period; 3 missed beats: the holder stopped
        pid = os.getpid()
        self.holder = dict(host=HOST, pid=pid, since=datetime.now().astimezone().isoformat(timespec='seconds'),
                           job=os.environ.get('SLURM_JOB_ID', ''), boot=BOOT, pidns=PIDNS,
                           start=(proc_stat(pid) or ('', ''))[1], token=uuid.uuid4().hex)
        self._stop, self._thread = threading.Event(), None

    def _create(self) -> bool:
        """Create the lock file (one creator wins, also on NFS v3+); False when a lock exists."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, 'w') as f:
            json.dump(self.holder, f, indent=1)
        return True

    def _read(self, strict: bool = False) -> Optional[Tuple[Optional[dict], float]]:
        """(holder, or None if unreadable; mtime) of the lock file; None when there is none. ``strict``: a read
        error (``OSError``, ``ValueError`` for a file that is not a JSON object) is raised instead."""
        holder, mtime = None, time.time()
        try:
            mtime = os.stat(self.path).st_mtime
            with open(self.path) as f:
                holder = json.load(f)
            if not isinstance(holder, dict):
                raise ValueError('not a JSON object')
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            if strict:
                raise
            holder = None
        return holder, mtime

    def _ours(self, seen) -> bool:
        return seen is not None and (seen[0] or {}).get('token') == self.holder['token']

    def _judge(self, holder: Optional[dict], age: float) -> Tuple[str, str]:
        """('held' | 'wait' | 'stale', why) for a lock file ``age`` seconds after its last heartbeat."""
        if holder and holder.get('host') == HOST:
            if holder.get('boot') and BOOT and holder['boot'] != BOOT:
                return 'stale', 'this machine restarted since'
            if same_pid_namespace(holder):  # else (a container on this host): its pid means nothing here
                if holder.get('pid') == os.getpid():
                    return 'stale', 'left by this process'
                if not is_running(holder.get('pid'), holder.get('start', '')):
                    return 'stale', f"its process {holder.get('pid')} is gone"
                return 'held', ''
        if age > self.stale_s:
            return 'stale', f'no heartbeat for {age / 60:.1f} min (--lock-stale-minutes {self.stale_s / 60:g})'
        return ('wait' if age > 3 * self.interval else 'held'), ''

    def _take_over(self, seen: Tuple[Optional[dict], float]) -> bool:
        """Replace the stale lock ``seen`` by ours; one job at a time (a short-lived ``.takeover`` guard)."""
        guard = self.path + '.takeover'
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:  # another job is taking over; a guard older than 30 s was left by a killed one
            with suppress(OSError):
                if time.time() - os.path.getmtime(guard) > 30:
                    os.remove(guard)
            return False
        try:
            if self._read() == seen:  # still the lock judged stale (no heartbeat, no other taker since)
                os.remove(self.path)
            return self._create()
        finally:
            os.remove(guard)

    def acquire(self) -> None:
        os.makedirs(self.folder, exist_ok=True)
        give_up, waiting = time.time() + self.stale_s + 60, False
        while not self._create():
            seen = self._read()
            if seen is None:  # released in between
                continue
            age = max(0.0, time.time() - seen[1])
            verdict, why = self._judge(seen[0], age)
            if verdict == 'held' or time.time() > give_up:
                raise FatalError(
                    f"run folder '{self.folder}' is in use by another job ({describe(seen[0])}; last heartbeat "
                    f"{age / 60:.1f} min ago); two jobs would overwrite each other's checkpoints. Wait for it to "
                    f"end or stop it; if it is gone, its lock '{self.path}' is stale after --lock-stale-minutes "
                    f"{self.stale_s / 60:g} without a heartbeat (or delete that file)")
            if verdict == 'wait':
                if not waiting:
                    _logger.warning(f"run lock '{self.path}' of {describe(seen[0])} has had no heartbeat for "
                                    f"{age / 60:.1f} min: waiting until it is stale (--lock-stale-minutes "
                                    f"{self.stale_s / 60:g})")
                waiting = True
                time.sleep(min(5.0, self.interval))
            elif self._take_over(seen):
                _logger.warning(f"took over the stale run lock '{self.path}' of {describe(seen[0])}: {why}")
                break
            else:
                time.sleep(0.2)
        self._thread = threading.Thread(target=self._beat, name='run-lock-heartbeat', daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        """Refresh the lock's mtime every beat. Only a readable lock naming another holder ends the heartbeat;
        a failed read or write (NFS ESTALE/EIO, too many open files) is retried at the next beat (while a read
        fails, the mtime is still refreshed: no other job replaces a lock whose heartbeat goes on), and logged
        at its first beat and then at most every ``WARN_EVERY_S``."""
        failed, warned = 0, -float('inf')
        while not self._stop.wait(self.interval):
            try:
                seen = self._read(strict=True)
                if seen is None:  # deleted by hand: put it back
                    self._create()
                elif not self._ours(seen):
                    _logger.error(f"run lock '{self.path}' was taken over by {describe(seen[0])}: two jobs write "
                                  f"this run folder now; stop one of them")
                    return
                else:
                    os.utime(self.path)
                if failed:
                    _logger.info(f"run lock '{self.path}' refreshed again after {failed} failed beat(s)")
                failed, warned = 0, -float('inf')
            except (OSError, ValueError) as e:
                failed += 1
                with suppress(OSError):
                    os.utime(self.path)
                if time.monotonic() - warned > self.WARN_EVERY_S:
                    warned = time.monotonic()
                    _logger.warning(f"could not read or refresh the run lock '{self.path}' "
                                    f"({getattr(e, 'strerror', None) or e}); the heartbeat goes on and retries at "
                                    f"every beat (this warning at most every {self.WARN_EVERY_S // 60} min)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            if self._ours(self._read()):
                os.remove(self.path)
        except OSError as e:
            _logger.warning(f"could not remove the run lock '{self.path}' ({e.strerror}); it goes stale")


def hold_run_lock(folder: str, args: Any) -> None:
    """Rank 0 takes ``folder``'s lock and, for a new run, checks the folder holds no run; every rank stops on the
    verdict (collective when distributed). ``args``: resume, experiment, lock_stale_minutes, rank, distributed.
    A dry run (``args.dry_run``) writes nothing: it only checks the folder."""
    error = None
    if getattr(args, 'dry_run', False):
        return None if getattr(args, 'resume', '') else check_new_run_folder(folder, getattr(args, 'experiment', ''))
    if getattr(args, 'rank', 0) == 0:
        lock = RunLock(folder, getattr(args, 'lock_stale_minutes', 10.0))
        try:
            lock.acquire()
            _held.append(lock)
            if not getattr(args, 'resume', ''):  # under the lock: a run that ended while this one started counts
                check_new_run_folder(folder, getattr(args, 'experiment', ''))
        except FatalError as e:
            error = str(e)
        except OSError as e:
            error = f"cannot create the run lock in '{folder}' ({e.strerror}); pass --output on a writable disk"
        if error is not None:
            release_run_lock()  # the lock of a refused run
    if getattr(args, 'distributed', False):
        box = [error]
        dist.broadcast_object_list(box, src=0)  # ranks > 0 wait here for rank 0's verdict
        error = box[0]
    if error is not None:
        raise FatalError(error)


def release_run_lock() -> None:
    """Release the locks this process holds, if any (every exit path of train_kd.py's main)."""
    while _held:
        _held.pop().release()
