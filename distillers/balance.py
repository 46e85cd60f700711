"""Loss balance: the gradient norm each weighted loss term sends into the student, on one batch.

Measured once before the first update, so a term that dwarfs the student's own loss is seen in the
first seconds of a run, not after hours of a student that does not learn. The measurement leaves no
trace: the task's buffers (BatchNorm statistics) and the torch RNG (dropout, drop-path) are put back,
and no ``.grad`` is written, so the run continues bit for bit as if it had not been taken.
"""
import json
import logging
import os
from collections import OrderedDict
from contextlib import suppress
from typing import Callable, Dict, Iterable, Optional

import torch
import torch.nn as nn
from timm import utils

_logger = logging.getLogger('train')

# a term whose gradient is 100x the task loss's owns the update direction: with clipping or an
# adaptive optimizer the task loss then steers less than 1% of every step. Healthy runs measured
# here stay within 10x of it (see the README's "Loss balance"); the 0/0 of a constant alternative
# view was 3e6x.
DEFAULT_FACTOR = 100.0


def reference_term(terms: Iterable[str]) -> str:
    """The student's own loss: ``loss_cls`` in distillation tasks, ``loss`` without distillation."""
    terms = list(terms)
    return 'loss_cls' if 'loss_cls' in terms else terms[0]


@torch.no_grad()
def _snapshot(task: nn.Module):
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return ({k: b.clone() for k, b in task.named_buffers()}, torch.get_rng_state(), cuda,
            list(task.__dict__.get('_teacher_times', [])))


@torch.no_grad()
def _restore(task: nn.Module, state) -> None:
    buffers, cpu, cuda, teacher_times = state
    for k, b in task.named_buffers():
        if k in buffers:
            b.copy_(buffers[k])
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    if '_teacher_times' in task.__dict__:
        task._teacher_times = teacher_times


def term_gradient_norms(
        task: nn.Module,
        input: torch.Tensor,
        target: torch.Tensor,
        params: Iterable[torch.Tensor],
        autocast: Callable = suppress,
        weights: Optional[Dict[str, float]] = None,
) -> Dict[str, float]:
    """L2 norm of d(weight * term)/d(params) for every weighted loss term of ``task(input, target)``.

    ``weights`` default to the task's ``loss_weights`` (``{'loss': 1}`` for a task without them).
    """
    params = [p for p in params if p.requires_grad]
    weights = dict(weights or getattr(task, 'loss_weights', None) or {'loss': 1.0})
    state = _snapshot(task)
    try:
        with autocast():
            out = task(input, target)
        keys = [k for k in weights if k in out]
        norms = OrderedDict()
        for i, k in enumerate(keys):
            grads = torch.autograd.grad(weights[k] * out[k].float(), params, retain_graph=i < len(keys) - 1,
                                        allow_unused=True)
            per_tensor = [torch.linalg.vector_norm(g.float()) for g in grads if g is not None]
            norms[k] = torch.linalg.vector_norm(torch.stack(per_tensor)).item() if per_tensor else 0.0
        del out
    finally:
        _restore(task, state)
    return norms


def unbalanced_terms(norms: Dict[str, float], factor: float = DEFAULT_FACTOR) -> Dict[str, float]:
    """Terms whose gradient norm exceeds ``factor`` x the reference term's (or is not finite): term -> ratio."""
    ref = norms[reference_term(norms)]
    out = {}
    for k, v in norms.items():
        ratio = v / ref if ref > 0 else float('inf') if v > 0 else 0.0
        if not (ratio <= factor):  # also catches nan
            out[k] = ratio
    return out


def log_loss_balance(args, task, input, target, amp_autocast, output_dir):
    """Gradient norm each weighted term sends into the student on the first batch; warn on a runaway term."""
    with (task.no_sync() if args.distributed else suppress()):
        norms = term_gradient_norms(task, input, target, task.get_eval_model().parameters(), amp_autocast)
    if not utils.is_primary(args):
        return
    ref = reference_term(norms)
    _logger.info('Loss balance (gradient norm of each weighted term into the student, first batch): ' + '  '.join(
        f'{k} {v:.3g}' + (f' ({v / norms[ref]:.2g}x)' if k != ref and norms[ref] > 0 else '') for k, v in norms.items()))
    bad = unbalanced_terms(norms, args.loss_balance_factor)
    if output_dir:  # None in a dry run
        with open(os.path.join(output_dir, 'loss_balance.json'), 'w') as f:
            json.dump({'gradient_norms': norms, 'reference': ref, 'factor': args.loss_balance_factor,
                       'over_factor': bad}, f, indent=1)
    for k, ratio in bad.items():
        _logger.warning(f'{k} sends {ratio:.3g}x the gradient of {ref} into the student (limit '
                        f'--loss-balance-factor {args.loss_balance_factor:g}): it will dominate training. Lower its '
                        f'weight, or check the inputs and the teacher')
