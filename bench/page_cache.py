"""Cold and warm runs for the benchmarks that read checkpoints: drop a folder's pages, or read them in."""

from __future__ import annotations

import os
from pathlib import Path


def drop(folder: Path | None = None) -> str:
    """Empty the page cache so that the next run reads from disk: all of it (root), else the pages of
    the files below ``folder`` (posix_fadvise DONTNEED after a sync). Returns what was dropped, "" when
    nothing could be (not root and no folder, or no posix_fadvise)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "page cache"
    except OSError:
        pass
    if folder is None or not hasattr(os, "posix_fadvise"):
        return ""
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return "the files' pages (fadvise)"


def warm(folder: Path, pattern: str = "*") -> None:
    """Read every file below ``folder`` matching ``pattern`` once, in 1 MiB reads (the reading process
    stays small)."""
    for p in sorted(folder.rglob(pattern)):
        if p.is_file():
            with p.open("rb") as f:
                while f.read(1 << 20):
                    pass
