"""Who holds a run lock, and whether its process still runs: this process's identity (host, boot, pid namespace)
and the checks ``runlock.RunLock`` makes on the identity another job recorded in ``run.lock``.

A pid means something only in the pid namespace that issued it. Two containers on one node can share the host
name and the boot id (``--network host``) and still have separate pid namespaces; ``same_pid_namespace`` tells
whether the holder's pid can be looked up here at all.
"""
import os
import socket
from contextlib import suppress
from typing import Any, Optional, Tuple

HOST = socket.gethostname()
BOOT = ''  # this boot of the machine: a pid from another boot means nothing
with suppress(OSError), open('/proc/sys/kernel/random/boot_id') as _f:
    BOOT = _f.read().strip()
# this process's pid namespace, e.g. 'pid:[4026531836]'; 'single' on a system without /proc (macOS: one pid space);
# '' where /proc does not tell (then no other process's pid counts as gone at once)
PIDNS = '' if os.path.isdir('/proc') else 'single'
with suppress(OSError):
    PIDNS = os.readlink('/proc/self/ns/pid')


def proc_stat(pid: int) -> Optional[Tuple[str, str]]:
    """(state, start time in ticks since boot) of a process from /proc; None when it does not exist."""
    try:
        with open(f'/proc/{int(pid)}/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()  # after "pid (comm)": field 3 (state) onwards
        return fields[0], fields[19]
    except (OSError, ValueError, IndexError):
        return None


def is_running(pid: Any, start: str) -> bool:
    """Is ``pid`` (on this machine, in this pid namespace) still the process that wrote the lock?"""
    if not isinstance(pid, int) or pid <= 0:
        return False
    if os.path.isdir('/proc/self'):
        info = proc_stat(pid)
        return info is not None and info[0] not in ('Z', 'X') and (not start or info[1] == start)
    try:
        os.kill(pid, 0)  # no /proc (macOS)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        pass
    return True


def same_pid_namespace(holder: dict) -> bool:
    """Can the pid of ``holder`` (a lock of this host and boot) be looked up here? True for a lock that records
    this process's pid namespace, and for a lock that records none (written before the namespace was recorded:
    judged by its pid, as it was then); False for another namespace, or when this process cannot tell its own."""
    if 'pidns' not in holder:
        return True
    return bool(PIDNS) and holder['pidns'] == PIDNS


def describe(holder: Optional[dict]) -> str:
    """The lock holder, for messages."""
    if not holder:
        return 'an unreadable lock'
    job = f", SLURM job {holder['job']}" if holder.get('job') else ''
    ns = ' (another pid namespace)' if holder.get('host') == HOST and not same_pid_namespace(holder) else ''
    return f"host {holder.get('host')}, pid {holder.get('pid')}{ns}{job}, since {holder.get('since')}"
