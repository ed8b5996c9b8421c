"""Which tensors are views of a file this process maps (disk offload: what still reads the shards)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = ["file_mappings", "inside", "mapped_from"]


def file_mappings(paths: Iterable[Path]) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of the files in ``paths`` (files, or every file in a
    folder), from /proc/self/maps; empty where that does not exist (then nothing is ever released)."""
    paths = list(paths)
    files = {str(p.resolve()) for p in paths if p.is_file()}
    folders = tuple(str(p.resolve()) + os.sep for p in paths if p.is_dir())
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and (parts[5] in files or (folders and parts[5].startswith(folders))):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end))
    return out


def mapped_from(t: torch.Tensor, paths: Iterable[Path]) -> bool:
    """Whether ``t``'s bytes lie in this process's mapping of one of ``paths`` (a view, not a copy)."""
    return inside(t, file_mappings(paths))


def inside(t: torch.Tensor, mappings: list[tuple[int, int]]) -> bool:
    """Whether ``t``'s bytes lie in one of ``mappings`` (address ranges from :func:`file_mappings`)."""
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    return any(a <= start and end <= b for a, b in mappings)
