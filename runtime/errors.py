"""Errors a run stops on with one message, and the exit codes a requeue script reads."""
import gc
import multiprocessing

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request, a recovery checkpoint was written; requeue me
EXIT_FATAL = 2  # bad input or a run that cannot continue; do not requeue


class FatalError(RuntimeError):
    """A run that must stop with one clear message (no traceback)."""
    exit_code = EXIT_FATAL


def release_frames(e: BaseException) -> None:
    """Drop the frames an exception holds (and those of its causes), then collect them: a DataLoader iterator
    still alive in them has its worker processes joined now, so none prints after the error message. The full
    collection runs only when worker processes are alive (it takes ~1 s in a large process, e.g. a test session)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e.__traceback__ = None
        e = e.__cause__ or e.__context__
    if multiprocessing.active_children():
        gc.collect()


def log_startup_error(logger, e: Exception) -> None:
    release_frames(e)
    msg = str(e)
    if 'Original Traceback' in msg:  # raised in a DataLoader worker: keep the message, drop the traceback
        msg = msg.rstrip().splitlines()[-1].split('FatalError: ', 1)[-1]
    logger.error(msg)  # timm's console formatter prints it as 'ERROR: <msg>'


def short(e: Exception) -> str:
    """``Type: first line of the message`` (at most 200 characters), for one-line error reports."""
    return f'{type(e).__name__}: {(str(e).splitlines() or [""])[0][:200]}'
