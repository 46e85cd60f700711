"""SIGTERM / SIGUSR1 / SIGINT set a flag; the train loop finishes its step, writes a recovery checkpoint and
exits with ``EXIT_PREEMPTED`` so a requeue script can tell preemption from failure."""
import logging
import signal
import time

import torch
import torch.distributed as dist

from .errors import EXIT_PREEMPTED

_logger = logging.getLogger('train')

_STOP = {'signal': None, 'time': 0.0}  # set by the handler; one per process, as signals are
# one stop often arrives twice: Ctrl-C reaches the workers from the terminal and again from torchrun,
# scancel signals every process of the job and torchrun forwards it too
_REPEAT_WINDOW_S = 2.0


def _handler(signum, frame):
    now = time.monotonic()
    if _STOP['signal'] is not None:
        if signum == signal.SIGINT and now - _STOP['time'] > _REPEAT_WINDOW_S:
            raise KeyboardInterrupt  # a second, later Ctrl-C stops at once (no recovery checkpoint)
        return
    _STOP['signal'], _STOP['time'] = signum, now
    _logger.warning(f'Received {signal.Signals(signum).name}: finishing this step, then saving a recovery '
                    f'checkpoint and exiting with code {EXIT_PREEMPTED} (Ctrl-C again to stop at once)')


def install_signal_handlers():
    """Catch SIGTERM / SIGUSR1 / SIGINT for a graceful stop; returns a function restoring the old handlers."""
    _STOP.update(signal=None, time=0.0)
    sigs = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    previous = {sig: signal.signal(sig, _handler) for sig in sigs}

    def restore():
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    return restore


def stop_requested(distributed: bool, device) -> bool:
    """True on every rank when any rank received a stop signal (collective when distributed)."""
    flag = _STOP['signal'] is not None
    if not distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
