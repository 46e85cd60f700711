"""RNG state of every stream (python, numpy, torch, cuda) and rank, in a form a weights-only checkpoint holds."""
import random
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist


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


def rng_from_tensors(saved):
    """The inverse of ``capture_rng_state``: a state ``set_rng_state`` takes."""
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
