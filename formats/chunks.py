"""Per-chunk sha256 of a shard: the digests of fixed-size pieces aligned to file offsets.

A file's sha256 is one sequential chain: a 5 GB shard hashes on one core (~1.3-2 GB/s with SHA-NI)
however many cores the host has. The digests of the file's ``size``-byte chunks (chunk ``k`` is bytes
``[k*size, min((k+1)*size, file size))``, the last one shorter) can be checked on any number of
threads, and by a loader that already holds the bytes (``converter.loader.stream`` hashes its
staging buffers): ``verify`` then costs almost nothing on a many-core host. The index records them
beside each shard's whole-file sha256 (``formats.index``, docs/format.md section 6), which stays for
readers that know no chunks.

16 MiB chunks: a 5 GB shard has ~300 of them (enough to keep 16 threads busy to the end, ~20 KB of
JSON in the index), each hashes in ~10 ms (a pool's per-task overhead is noise), and the streamed
GPU load reads the same 16 MiB pieces into pinned staging buffers, one held per hashing reader:
10 x 16 MiB pinned with 8 readers (6 x 32 MiB without verify).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Bytes per chunk written by this version (readers take the size recorded in the index).
CHUNK_BYTES = 16 << 20
#: Allowed chunk sizes: powers of two in this range (a reader allocates buffers of this size).
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 4096, 1 << 30

_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class ChunkDigests:
    """The sha256 (hex) of each ``size``-byte chunk of one file, in file order."""

    size: int
    sha256: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": list(self.sha256)}

    @classmethod
    def from_json(cls, obj: Any, file_size: int, where: str) -> ChunkDigests:
        """Parse and check an index entry's ``chunks`` against the file size it describes; raises
        ValueError with a message naming ``where``."""
        size = obj.get("size") if isinstance(obj, dict) else None
        digests = obj.get("sha256") if isinstance(obj, dict) else None
        if not isinstance(size, int) or not MIN_CHUNK_BYTES <= size <= MAX_CHUNK_BYTES or size & (size - 1):
            bounds = f"[{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}]"
            msg = f"{where}: chunks.size {size!r} is not a power of two in {bounds}"
            raise ValueError(msg)
        if not isinstance(digests, list) or len(digests) != chunk_count(file_size, size):
            got = len(digests) if isinstance(digests, list) else digests
            msg = f"{where}: chunks.sha256 must list {chunk_count(file_size, size)} digests, got {got!r}"
            raise ValueError(msg)
        if not all(isinstance(d, str) and len(d) == 64 and _HEX.issuperset(d) for d in digests):
            msg = f"{where}: chunks.sha256 holds a value that is not 64 lowercase hex digits"
            raise ValueError(msg)
        return cls(size, tuple(digests))

    def span(self, k: int, file_size: int) -> tuple[int, int]:
        """(offset, length) of chunk ``k`` in a file of ``file_size`` bytes."""
        start = k * self.size
        return start, min(self.size, file_size - start)


def chunk_count(file_size: int, size: int) -> int:
    """How many chunks a file of ``file_size`` bytes has (an empty file has none)."""
    return -(-file_size // size)


def read_exact(fd: int, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` from ``fd`` at ``offset`` (os.preadv until full; the GIL released meanwhile)."""
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            msg = f"unexpected end of file at byte {offset + done}"
            raise OSError(msg)
        done += got


_buffers = threading.local()


def hash_range(path: Path, offset: int, nbytes: int) -> str:
    """sha256 (hex) of ``nbytes`` bytes of ``path`` at ``offset``, read into this thread's buffer."""
    buf = getattr(_buffers, "buf", None)
    if buf is None or len(buf) < nbytes:
        buf = _buffers.buf = bytearray(nbytes)
    view = memoryview(buf)[:nbytes]
    fd = os.open(path, os.O_RDONLY)
    try:
        read_exact(fd, view, offset)
    finally:
        os.close(fd)
    return hashlib.sha256(view).hexdigest()  # releases the GIL (more than 2 KiB)


def hash_file(path: Path, size: int | None = None, *, threads: int = 2) -> tuple[str, ChunkDigests]:
    """(whole-file sha256, chunk digests of ``size`` bytes, default ``CHUNK_BYTES``) of ``path`` in one
    read: the whole-file hash runs on this thread while ``threads`` others hash the chunks, so it takes
    the time of the whole-file hash alone wherever a core is free. At most ``threads + 1`` chunks are
    held at once."""
    size = size or CHUNK_BYTES
    whole = hashlib.sha256()
    futures: list[Future[str]] = []
    in_flight: deque[Future[str]] = deque()
    with open(path, "rb") as f, ThreadPoolExecutor(max(1, threads)) as pool:
        while True:
            block = f.read(size)  # buffered: a full chunk unless at the end of the file
            if not block:
                break
            while len(in_flight) > threads:
                in_flight.popleft().result()
            fut = pool.submit(lambda b: hashlib.sha256(b).hexdigest(), block)
            futures.append(fut)
            in_flight.append(fut)
            whole.update(block)
            if len(block) < size:
                break
        digests = tuple(fut.result() for fut in futures)
    return whole.hexdigest(), ChunkDigests(size, digests)


def mismatch_line(path: Path, chunks: ChunkDigests, file_size: int, got: Mapping[int, str]) -> str | None:
    """One line naming the first chunk of ``path`` whose digest in ``got`` differs (and how many do),
    or None when every chunk in ``got`` matches."""
    bad = sorted(k for k, d in got.items() if d != chunks.sha256[k])
    if not bad:
        return None
    k = bad[0]
    start, n = chunks.span(k, file_size)
    more = f"; {len(bad)} of {len(chunks.sha256)} chunks differ" if len(bad) > 1 else ""
    return (
        f"{path}: sha256 of chunk {k} (bytes {start}-{start + n - 1}) is {got[k]}, index says "
        f"{chunks.sha256[k]}{more}"
    )
