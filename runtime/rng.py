"""RNG state of every stream (python, numpy, torch, cuda) and rank, in a form a weights-only checkpoint holds.

The CUDA state is one generator state per visible device plus ``cuda_device``, the device this process ran on;
``set_cuda_rng_states`` restores it where another number of devices is visible (srun ``--gpus-per-task=1`` after
a torchrun that saw 8): this process's device continues the saved process's own device's stream.
"""
import logging
import random
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

_logger = logging.getLogger('train')
_warned = set()  # (saved, visible) device counts already warned about


def get_rng_state() -> Dict[str, Any]:
    state = {
        'python': random.getstate(),
        'numpy': np.random.get_state(),
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
        state['cuda_device'] = torch.cuda.current_device()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if 'cuda' in state:
        set_cuda_rng_states(state['cuda'], state.get('cuda_device'))


def set_cuda_rng_states(saved_states: Sequence[torch.Tensor], own_index: Optional[int] = None) -> None:
    """Restore the CUDA generator states ``saved_states`` (one per device the saving process saw) on the devices
    this process sees; nothing without CUDA. Device i gets entry i where both have it, and this process's current
    device gets entry ``own_index`` (the device the saving process ran on; None: the current device's index), so
    its stream continues where it was also when the number of visible devices changed (then one warning: GPU-side
    random ops are not guaranteed bit-exact). Never an IndexError."""
    if not torch.cuda.is_available() or not saved_states:
        return
    count, current = torch.cuda.device_count(), torch.cuda.current_device()
    own = current if own_index is None else int(own_index)
    for i in range(min(count, len(saved_states))):
        if i != current:
            torch.cuda.set_rng_state(saved_states[i], i)
    if 0 <= own < len(saved_states):
        torch.cuda.set_rng_state(saved_states[own], current)
    if (len(saved_states), count) not in _warned and (len(saved_states) != count or not 0 <= own < len(saved_states)):
        _warned.add((len(saved_states), count))
        kept = f'cuda:{current} continues the saved stream of cuda:{own}' if 0 <= own < len(saved_states) else \
            f'cuda:{current} keeps its own stream (the saved process ran on cuda:{own})'
        _logger.warning(f"CUDA RNG states were saved by a process that saw {len(saved_states)} GPU(s); this process "
                        f"sees {count}: {kept}; GPU-side random ops (dropout, drop-path, random erasing on the GPU) "
                        f"are not guaranteed bit-exact after this resume. Resume with the same visible GPUs per "
                        f"process for an exact continuation")


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
        if state.get('cuda_device') is not None:
            out['cuda_device'] = int(state['cuda_device'])
    return out


def rng_from_tensors(saved, rank: int = 0):
    """The inverse of ``capture_rng_state``: a state ``set_rng_state`` takes. ``rank``: the rank that saved it,
    for a state saved before ``cuda_device`` was recorded (torchrun's device, ``rank % devices per node``)."""
    py = saved['python']
    npst = saved['numpy']
    state = {
        'python': (py[0], tuple(py[1]), py[2]),
        'numpy': (npst[0], npst[1].numpy().astype(np.uint32), npst[2], npst[3], npst[4]),
        'torch': saved['torch'],
    }
    if 'cuda' in saved:
        state['cuda'] = saved['cuda']
        state['cuda_device'] = saved.get('cuda_device', rank % len(saved['cuda']) if saved['cuda'] else None)
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
