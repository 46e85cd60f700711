"""The students of one run: ``train_kd.py --model A`` trains a list of one, ``--model A,B,C`` a list of several from one
teacher pass. Each student's own state (``StudentRun``), its folder name, its own torch RNG stream when several step
on one batch (``StudentStream``), the stop marker a student stopped alone leaves, and where ``--resume auto`` resumes
the healthy students."""
import json
import logging
import os
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from timm.models import safe_model_name

from .checkpoint import atomic_write
from .errors import FatalError
from .resume import checkpoint_position, is_valid_checkpoint
from .rng import set_cuda_rng_states

_logger = logging.getLogger('train')

STOP_MARKER = 'stopped.json'  # a student of a joint run stopped alone (its non-finite policy); --resume auto skips it


class StudentRun:
    """One student: its own args (a deep copy: no setting is shared with another student), args.yaml text and run
    folder; its task, optimizer, loss scaler, schedule, saver, writer, non-finite guard, epoch sums, RNG stream and
    resume state; ``error`` once it has stopped (the other students go on)."""

    def __init__(self, args, text: str, output_dir: str):
        self.args, self.text, self.output_dir = args, text, output_dir
        self.name = os.path.basename(output_dir) if output_dir else args.model
        self.task = self.optimizer = self.loss_scaler = self.scheduler = self.saver = self.writer = None
        self.guard = self.sums = self.stream = self.grad_norm = self.config = None
        self.resume_path, self.extras, self.error = '', None, None
        self.best_metric = self.best_epoch = None

    @property
    def live(self) -> bool:
        return self.error is None


def sub_folders(students: List[Tuple[str, str]]) -> List[str]:
    """``<model>-<distiller>`` per student of a joint run; a pair that repeats gets ``-2``, ``-3``, ..."""
    seen: Dict[str, int] = {}
    out = []
    for model, distiller in students:
        base = f'{safe_model_name(model)}-{distiller}'
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f'{base}-{seen[base]}')
    return out


# --- each student's own torch RNG stream (drop-path, dropout) in a joint step -----------------------------------------
def torch_rng() -> dict:
    """The torch RNG state (CPU, every visible CUDA device, and the device this process runs on)."""
    state = {'cpu': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
        state['cuda_device'] = torch.cuda.current_device()
    return state


def set_torch_rng(state: dict) -> None:
    """Restore ``torch_rng()``'s state; CUDA states through ``rng.set_cuda_rng_states`` (a run resumed where each
    process sees another number of GPUs gets its own device's saved stream, never an IndexError)."""
    torch.set_rng_state(state['cpu'])
    if state.get('cuda') is not None:
        set_cuda_rng_states(state['cuda'], state.get('cuda_device'))


class StudentStream:
    """A student's own torch RNG stream for its step, forked from the process's stream at the first batch of each
    epoch, where its solo run's first step starts drawing. The process's stream then serves the data pipeline alone,
    as in a solo run whose loader has workers, so each student draws what it draws alone. ``enabled=False`` (a run of
    one student) steps on the process's stream itself, exactly as a solo run always has."""

    def __init__(self, saved: Optional[dict] = None, enabled: bool = True):
        self.state, self.enabled = saved, enabled

    def __enter__(self):
        if self.enabled:
            self.outer = torch_rng()
            if self.state is None:
                self.state = self.outer
            set_torch_rng(self.state)
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.state = torch_rng()
            set_torch_rng(self.outer)
        return False


def own_stream(saved_streams: Optional[list], rank: int, world_size: int, name: str) -> Optional[dict]:
    """This rank's saved stream of a recovery checkpoint; None (a fresh fork, with a warning) when the checkpoint was
    written by fewer processes than resume it."""
    if not saved_streams:
        return None
    if rank >= len(saved_streams):
        if rank == len(saved_streams):
            _logger.warning(f'Student {name}: its recovery checkpoint holds the RNG streams of {len(saved_streams)} '
                            f'process(es), resumed by {world_size}: ranks from {rank} on fork a new stream (not an '
                            f'exact resume)')
        return None
    return saved_streams[rank]


def gather(distributed: bool, state) -> list:
    """``state`` of every rank (collective when distributed), for a recovery checkpoint."""
    if not distributed:
        return [state]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, state)
    return out


# --- a student stopped alone, and --resume auto --------------------------------------------------------------------
def write_stop_marker(folder: str, reason: str, epoch: int, batch_idx: int) -> None:
    """``<folder>/stopped.json``: this student of a joint run stopped alone; ``--resume auto`` of the joint run
    leaves it stopped (a solo ``--resume`` of the folder ignores the marker)."""
    text = json.dumps({'reason': reason, 'epoch': epoch, 'batch': batch_idx}, indent=1)
    os.makedirs(folder, exist_ok=True)
    atomic_write(os.path.join(folder, STOP_MARKER), lambda f: f.write(text.encode()))


def read_stop_marker(folder: str) -> Optional[dict]:
    path = os.path.join(folder, STOP_MARKER)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {'reason': f'{path} (unreadable)', 'epoch': '?', 'batch': '?'}


def positions(folder: str) -> Dict[Tuple[int, float], str]:
    """{(epoch, batch): checkpoint file} of ``folder`` (epoch ends as batch inf; last.pth.tar preferred)."""
    out = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not name.endswith('.pth.tar') or name.startswith(('tmp', 'recovery_tmp')):
            continue
        pos = checkpoint_position(os.path.join(folder, name))
        if pos is not None and (pos not in out or name == 'last.pth.tar'):
            out[pos] = os.path.join(folder, name)
    return out


def resume_positions(runs: List[StudentRun]) -> None:
    """``--resume auto`` of a joint run: the healthy students (no stop marker) resume at the newest position all of
    their folders hold a loadable checkpoint of (they train in step; a stop between two students' saves leaves one a
    save ahead, and it goes back to the other's). A stopped student is left stopped: it sets no position."""
    live = [r for r in runs if r.live]
    found = [positions(r.output_dir) for r in live]
    if not any(found):
        return
    if not all(found):
        missing = [r.output_dir for r, f in zip(live, found) if not f]
        raise FatalError(f"--resume auto: {', '.join(missing)} holds no checkpoint while the other students' folders "
                         f"do; resume the students one by one, or start the joint run in a new --experiment")
    for pos in sorted(set(found[0]).intersection(*found[1:]), reverse=True):
        if all(is_valid_checkpoint(f[pos]) for f in found):  # a damaged file: the next older common position
            for r, f in zip(live, found):
                r.resume_path = f[pos]
                _logger.info(f"--resume auto: resuming from '{f[pos]}'")
            return
    raise FatalError('--resume auto: the students\' folders hold no checkpoint of a common position; resume them '
                     'one by one')
