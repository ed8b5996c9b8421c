"""The non-blocking exclusive flock on a folder that keeps two runs out of one folder: the output
(writer/manifest.py ``FolderLock``) and the Hub download folder beside it (sources/hub.py)."""

from __future__ import annotations

import os
from pathlib import Path


def lock_folder(folder: Path) -> int | None:
    """Take an exclusive flock on ``folder`` itself (no lock file to clean up): the descriptor that
    holds it (closing it drops the lock, and so does the end of the process, even killed), or None
    when another process holds it."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
