"""The non-blocking exclusive flock on a folder that keeps two runs out of one folder: the output
(writer/manifest.py ``FolderLock``) and the Hub download folder beside it (sources/hub.py); and the
temp folders of a run's own (Hub downloads, the loader's offload folders), locked while their run
lives so that a later run removes those a killed run left."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
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


def locked_temp_folder(base: Path, prefix: str) -> tuple[Path, int]:
    """A new folder in ``base`` named ``prefix`` + random (``tempfile.mkdtemp``), and the descriptor of
    its flock, taken as soon as it exists: a run that finds it unlocked (``remove_if_unlocked``) knows
    that its run is gone."""
    for _ in range(3):
        folder = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
        try:
            fd = lock_folder(folder)
        except FileNotFoundError:
            continue  # removed as abandoned between the mkdtemp and the lock
        if fd is None:
            continue  # locked by a run removing it as abandoned
        try:
            if os.path.samestat(os.fstat(fd), os.stat(folder)):
                return folder, fd
        except FileNotFoundError:
            pass
        os.close(fd)
    msg = f"{base}: could not make a folder of this run's own (removed as soon as made); retry"
    raise OSError(errno.EAGAIN, msg)


def remove_if_unlocked(folder: Path) -> bool:
    """Remove ``folder``, one of this user's ``locked_temp_folder`` folders, unless a live process
    holds its lock (a process killed leaves it unlocked); whether it was removed."""
    try:
        if folder.is_symlink() or not folder.is_dir() or folder.stat().st_uid != os.getuid():
            return False
        fd = lock_folder(folder)
    except OSError:
        return False
    if fd is None:
        return False  # its process is alive
    try:
        if os.path.samestat(os.fstat(fd), os.stat(folder)):
            shutil.rmtree(folder, ignore_errors=True)
            return True
    except FileNotFoundError:
        pass  # removed by another process meanwhile
    finally:
        os.close(fd)
    return False
