"""Non-finite losses and gradients: stop naming the term(s), or skip the update up to a limit."""
import logging
from typing import Dict

import torch
import torch.distributed as dist

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

    @staticmethod
    def with_gradient(terms: Dict[str, torch.Tensor], params) -> Dict[str, torch.Tensor]:
        """``terms`` plus a ``gradient`` term, nan when any gradient of ``params`` holds inf/nan (no host sync)."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return dict(terms)
        # per-tensor norms in a few fused kernels; inf/nan in any gradient makes its norm non-finite
        grad_ok = torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
        return dict(terms, gradient=torch.where(grad_ok, 0.0, float('nan')))

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
