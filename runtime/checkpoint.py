"""Checkpoint I/O, one home for every script: the atomic writer, the weights-only reader, the strict loader.

* ``atomic_write``: a temporary file next to the target, fsynced, optionally checked, renamed over
  the target and the folder fsynced, so a crash at any moment leaves the old file or the new one.
  ``atomic_write_dir``: the same for a new folder (never over a non-empty one).
* ``load_weights_only``: ``torch.load(weights_only=True)`` (plus ``argparse.Namespace``, the run's
  args); a pickle that needs other globals is refused with one message naming them.
* ``read_checkpoint``: the weights of a training checkpoint, a plain state dict or a ``.safetensors``.
* ``load_strict``: a strict load whose error lists the missing, unexpected and wrongly shaped keys.
"""
import argparse
import errno
import json
import os
import pickle
import shutil
from typing import Any, Callable, Dict, Optional, Tuple

import safetensors
import safetensors.torch
import torch
import torch.nn as nn

from timm.models import clean_state_dict

from .errors import FatalError, short


def fsync_dir(path: str) -> None:
    """fsync the folder holding ``path`` (makes a rename in it durable)."""
    fd = os.open(os.path.dirname(os.path.abspath(path)) or '.', os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable, check: Optional[Callable[[str], None]] = None,
                 tmp: Optional[str] = None) -> None:
    """Publish ``path`` atomically: ``write(f)`` fills an open temporary file, ``check(tmp)`` may refuse it.

    The temporary file (default ``<path>.partial.<pid>``) is removed when writing or the check
    raises an exception; a killed process leaves it behind (``RunSaver`` removes such files at start).
    """
    tmp = tmp or f'{path}.partial.{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
        fsync_dir(path)
    except Exception:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def atomic_write_dir(path: str, fill: Callable[[str], None]) -> None:
    """Publish the folder ``path`` atomically: ``fill(tmp)`` creates and fills (and may check) a hidden sibling
    folder, whose files are fsynced before it is renamed onto ``path``. ``path`` must be missing or an empty folder:
    a non-empty one is never replaced (the rename fails). The sibling is removed on any error."""
    path = os.path.abspath(path)
    tmp = os.path.join(os.path.dirname(path), f'.partial-{os.getpid()}-{os.path.basename(path)}')
    try:
        fill(tmp)
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), 'rb') as f:
                os.fsync(f.fileno())
        fsync_dir(os.path.join(tmp, '.'))
        os.rename(tmp, path)
        fsync_dir(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_error(path: str, e: Exception) -> FatalError:
    # torch.save turns the OSError of a failed write (ENOSPC, EDQUOT, EIO) into a RuntimeError
    cause = e if isinstance(e, OSError) else e.__context__ if isinstance(e.__context__, OSError) else None
    reason = (cause.strerror or str(cause)) if cause is not None else str(e).splitlines()[0][:200]
    hint = 'Free disk space or pass --output on another disk' if cause is not None and cause.errno in (
        errno.ENOSPC, errno.EDQUOT) else 'Check the output disk'
    return FatalError(f"could not write checkpoint '{path}' ({reason}); the previous checkpoints are untouched. "
                      f"{hint}, then restart with --resume auto")


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save`` through ``atomic_write``; a failed write stops the run naming the file and the cause."""
    try:
        atomic_write(path, lambda f: torch.save(obj, f))
    except (OSError, RuntimeError) as e:
        raise _write_error(path, e) from None


def atomic_copy(src: str, dst: str) -> None:
    def copy(f):
        with open(src, 'rb') as s:
            shutil.copyfileobj(s, f)
    try:
        atomic_write(dst, copy)
    except OSError as e:
        raise _write_error(dst, e) from None


class StandIn:
    """What a global named in ``load_weights_only(stand_ins=...)`` reads as: no code of it runs, its state is dropped."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def load_weights_only(path: str, what: str = '--checkpoint', mmap: bool = False, stand_ins: Tuple[str, ...] = ()) -> Any:
    """torch.load with weights_only=True (plus argparse.Namespace); one clear FatalError for any bad file.
    ``stand_ins``: module prefixes (e.g. ``'mmengine.'``) whose globals in the pickle read as inert ``StandIn``
    objects (bookkeeping next to the weights, such as mmengine's log history); none of their code is imported."""
    if not os.path.isfile(path):
        raise FatalError(f"{what} '{path}' does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if unsafe and stand_ins and all(name.startswith(stand_ins) for name in unsafe):
            with torch.serialization.safe_globals([argparse.Namespace] + [(StandIn, name) for name in unsafe]):
                return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
        raise FatalError(f"{what} '{path}' was refused: loading it would import {', '.join(unsafe) or 'code'}, "
                         f"and a pickle that imports code can run it. Only weights-only checkpoints are read; "
                         f"re-save its state_dict in a trusted environment (or use export.py)") from None
    except Exception as e:
        raise FatalError(f"{what} '{path}' cannot be read ({short(e)}); it is truncated or not a PyTorch "
                         f"checkpoint") from None


def read_checkpoint(path: str, use_ema: Optional[bool] = False, what: str = '--checkpoint',
                    mmap: bool = False) -> Tuple[dict, dict, str]:
    """Read weights safely. Returns (state_dict, the run's args or the file's metadata, which entry was used).
    ``use_ema``: True the EMA (an error without one), None the EMA when the checkpoint has one, False the student.
    ``mmap``: a .pth is memory-mapped (reading a few tensors' shapes costs no full read)."""
    if path.endswith('.safetensors') and os.path.isfile(path):
        try:
            with safetensors.safe_open(path, 'pt') as f:
                meta = f.metadata() or {}
            return safetensors.torch.load_file(path), json.loads(meta.get('scalekd', '{}')), 'file'
        except Exception as e:
            raise FatalError(f"{what} '{path}' is not a readable safetensors file ({short(e)}); "
                             f"export it again with export.py") from None
    ckpt = load_weights_only(path, what, mmap=mmap)
    if not isinstance(ckpt, dict):
        raise FatalError(f"{what} '{path}' holds a {type(ckpt).__name__}, not a state dict or checkpoint")
    run_args = vars(ckpt['args']) if isinstance(ckpt.get('args'), argparse.Namespace) else {}
    key = next((k for k in (('state_dict_ema', 'model_ema') if use_ema is not False else ()) + ('state_dict', 'model')
                if isinstance(ckpt.get(k), dict)), '')
    if use_ema and key not in ('state_dict_ema', 'model_ema'):
        raise FatalError(f"{what} '{path}' has no EMA weights (state_dict_ema; the run had no --model-ema); "
                         f"drop --use-ema")
    state = ckpt[key] if key else ckpt
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FatalError(f"{what} '{path}' holds no state dict of tensors (keys: {', '.join(list(ckpt)[:8])})")
    if any(k.startswith('student.') for k in state):
        raise FatalError(f"{what} '{path}' is a checkpoint of the official ScaleKD code (student.* keys); convert "
                         f"it first: python export.py --from-official --model NAME --checkpoint {path} --output F")
    return clean_state_dict(state), run_args, key or 'file'


def describe_mismatch(missing, unexpected, shapes, limit=8) -> str:
    parts = []
    for label, keys in (('missing', missing), ('unexpected', unexpected), ('wrong shape', shapes)):
        if keys:
            shown = ', '.join(keys[:limit]) + (f' ... (+{len(keys) - limit} more)' if len(keys) > limit else '')
            parts.append(f'{len(keys)} {label} keys: {shown}')
    return '; '.join(parts)


def load_strict(model: nn.Module, state: Dict[str, torch.Tensor], path: str, desc: str, hint: str,
                what: str = 'checkpoint', error: type = FatalError) -> None:
    """``model.load_state_dict(state, strict=True)``; a mismatch raises ``error`` listing the keys, then ``hint``."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(f'{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}' for k in own
                    if k in state and hasattr(state[k], 'shape') and state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise error(f"{what} '{path}' does not fit {desc}: {describe_mismatch(missing, unexpected, shapes)}. {hint}")
    model.load_state_dict(state, strict=True)


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
