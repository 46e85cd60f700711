"""What code a run ran: the git commit of the checkout, for the start-up log."""
import os
import subprocess
from functools import partial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_version(root: str = ROOT) -> str:
    """The git commit of ``root`` ('+changes' when tracked files differ), or 'not a git checkout'."""
    git = partial(subprocess.run, cwd=root, capture_output=True, text=True, timeout=10)
    try:
        sha = git(['git', 'rev-parse', '--short=12', 'HEAD'], check=True).stdout.strip()
        dirty = git(['git', 'status', '--porcelain', '--untracked-files=no']).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return 'not a git checkout'
    return f"git {sha}{'+changes' if dirty else ''}"
