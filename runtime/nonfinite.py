"""Non-finite losses and gradients: stop naming the term(s), or skip the update up to a limit; the update's one
gradient norm (shared by the non-finite check, gradient clipping and the log line)."""
import logging
from typing import Dict, Iterable, Optional

import torch
import torch.distributed as dist
from timm.utils import dispatch_clip_grad

from .errors import FatalError

_logger = logging.getLogger('train')


class NonFiniteGuard:
    """``abort``: stop naming the non-finite term(s); ``skip``: drop the update, abort after ``max_skips``."""

    def __init__(self, policy: str = 'abort', max_skips: int = 10, distributed: bool = False, device=None):
        self.policy = policy
        self.max_skips = max_skips
        self.distributed = distributed
        self.device = device
        self.skipped = 0
        self._seen = None  # abort policy: [term names, flags so far, first update, last update] since the last flush

    @staticmethod
    def _flags(terms: Dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([(~torch.isfinite(v.detach().float())).any() for v in terms.values()]).float()

    def skip_update(self, terms: Dict[str, torch.Tensor], step: int) -> bool:
        """True when this update must be skipped. ``abort`` notes the terms (no host sync) and ``flush`` decides."""
        if self.policy == 'abort':
            self.observe(terms, step)
            return False
        return self.check(terms, step)

    def observe(self, terms: Dict[str, torch.Tensor], step: int) -> None:
        """``abort`` policy: note non-finite terms on the device, without a host sync; ``flush`` decides."""
        flags = self._flags(terms)
        if self._seen is None or self._seen[0] != list(terms):
            self._seen = [list(terms), flags, step, step]
        else:
            self._seen[1] = torch.maximum(self._seen[1], flags)
            self._seen[3] = step

    def flush(self, what: str = 'loss') -> None:
        """Raise (on every rank) if any observed update had a non-finite term; call before saving."""
        seen, self._seen = self._seen, None
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


def norm_and_clip(params: Iterable, max_norm: Optional[float] = None, mode: str = 'norm',
                  clip_params: Optional[Iterable] = None) -> Optional[torch.Tensor]:
    """The update's gradient norm (total L2 over ``params``), then ``--clip-grad`` applied; no host sync.

    Mode 'norm' clips ``params`` with that norm: torch's clip_grad_norm_ is exactly these two calls
    (get_total_norm, clip_grads_with_norm_), so the update is the same bit for bit, and the norm is
    computed once instead of once for the non-finite check and once more for the clip. Other modes go to
    timm's dispatch_clip_grad on ``clip_params``. Returns the norm (inf/nan when any gradient holds
    inf/nan: the guard's ``gradient`` term), or None when no parameter has a gradient.
    """
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if max_norm is not None:
        if mode == 'norm':
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        else:
            dispatch_clip_grad(params if clip_params is None else list(clip_params), value=max_norm, mode=mode)
    return norm
