"""Distributed set-up: a timeout for every collective, and one clear line when a peer rank died or hung."""
import re
from contextlib import contextmanager
from datetime import timedelta
from typing import Optional

import torch.distributed as dist


@contextmanager
def collective_timeout(seconds: Optional[float]):
    """Give the process group that timm's ``init_distributed_device`` creates a collective timeout.

    Any collective that waits longer (a rank died, hangs or lost its network) raises on the ranks
    still alive instead of blocking forever; torchrun then stops the launch with a non-zero code.
    """
    if not seconds:
        yield
        return
    # NOTE: init_process_group is patched for the duration of the call because timm's
    # init_distributed_device takes no timeout and creates the process group itself; the patch only
    # adds timeout= when the caller passes none, and the original is put back on exit.
    original = dist.init_process_group

    def init_process_group(*args, **kwargs):
        kwargs.setdefault('timeout', timedelta(seconds=float(seconds)))
        return original(*args, **kwargs)

    dist.init_process_group = init_process_group
    try:
        yield
    finally:
        dist.init_process_group = original


_PEER_FAILURE = ('Timed out', 'timed out', 'Connection closed by peer', 'Connection reset by peer',
                 'Broken pipe', 'NCCL communicator was aborted', 'ProcessGroupNCCL')


def collective_failure_message(e: BaseException, rank: int, timeout: Optional[float]) -> Optional[str]:
    """One clear line for a collective that failed because another rank died or hung, else None."""
    backend_error = getattr(dist, 'DistBackendError', ())
    text = str(e)
    if not (isinstance(e, backend_error) or (isinstance(e, RuntimeError) and any(s in text for s in _PEER_FAILURE))):
        return None
    detail = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    detail = re.sub(r'^\[[^\]]*\]\s*', '', detail)[:200]  # drop the "[.../pair.cc:561]" source prefix
    return (f'rank {rank}: a collective failed because another rank died or stopped responding ({detail}; '
            f'--dist-timeout {timeout:g}s). The first failing rank\'s log has the cause; after fixing it, '
            f'restart the launch with --resume auto')


def broadcast_module(module, device=None, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into ``module`` on every rank (collective), e.g. a teacher
    without a checkpoint, whose random initialisation would otherwise differ between ranks. Each tensor goes
    through ``device`` (NCCL broadcasts GPU tensors only)."""
    import torch
    if not (dist.is_available() and dist.is_initialized()):
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            buf = t.data.to(device) if device is not None else t.data
            dist.broadcast(buf, src)
            if buf is not t.data:
                t.data.copy_(buf)
