"""Which tensors are views of a file this process maps (disk offload: what still reads the shards), and
dropping their pages from the process."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

__all__ = ["drop_pages", "file_mappings", "inside", "mapped_from", "page_ranges", "unwritten_runs"]


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


def page_ranges(tensors: Iterable[torch.Tensor], mappings: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The whole pages covered by the file-mapped tensors among ``tensors``, merged."""
    page = mmap.PAGESIZE
    spans = sorted(
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
        for t in tensors
        if t.numel() and inside(t, mappings)
    )
    merged: list[list[int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    out = []
    for a, b in merged:
        start, end = -(-a // page) * page, b // page * page  # rounded inward: only pages of these tensors
        if end > start:
            out.append((start, end))
    return out


_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
if _libc is not None:
    _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def drop_pages(ranges: Iterable[tuple[int, int]]) -> None:
    """Drop ``ranges`` (from :func:`page_ranges`) from this process's RSS: ``MADV_DONTNEED`` on a private,
    never-written file mapping, so the next access reads them again from the page cache or the file
    (Linux; elsewhere nothing: the OS reclaims them when it needs to). The caller keeps the mapping
    alive (holds a tensor of it): an unmapped range may be reused by another mapping, which this
    would zero."""
    if _libc is None:
        return
    for start, end in ranges:
        _libc.madvise(start, end - start, mmap.MADV_DONTNEED)


def unwritten_runs(start: int, end: int) -> list[tuple[int, int]]:
    """The runs of pages in ``[start, end)`` (page-aligned, a private file mapping) that this process
    never wrote, from /proc/self/pagemap: a page written in place (``weight.data += delta``, PEFT's merge
    of a 16-bit layer) became the process's private copy, which ``MADV_DONTNEED`` would discard, the
    file's bytes read back in its place. Written: present and not a file page (bit 61), or swapped out
    (bit 62). Where pagemap cannot be read, the whole range."""
    page = mmap.PAGESIZE
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
        try:
            raw = os.pread(fd, (end - start) // page * 8, start // page * 8)
        finally:
            os.close(fd)
    except OSError:
        return [(start, end)]
    entries = np.frombuffer(raw, dtype=np.uint64)
    if len(entries) * page != end - start:  # a short read: nothing is dropped that may have been written
        return []
    present, swapped, file_page = (
        ((entries >> np.uint64(bit)) & np.uint64(1)).astype(bool) for bit in (63, 62, 61)
    )
    written = (present & ~file_page) | swapped
    if not written.any():
        return [(start, end)]
    edges = np.flatnonzero(np.diff(np.concatenate(([True], written, [True])).astype(np.int8)))
    return [
        (start + int(a) * page, start + int(b) * page) for a, b in zip(edges[::2], edges[1::2], strict=True)
    ]
