"""Per-chunk sha256 of a shard: the digests of fixed-size pieces aligned to file offsets.

A file's sha256 is one sequential chain: a 5 GB shard hashes on one core (~1.3-2 GB/s with SHA-NI)
however many cores the host has. The digests of the file's ``size``-byte chunks (chunk ``k`` is bytes
``[k*size, min((k+1)*size, file size))``, the last one shorter) can be checked on any number of
threads, and by a loader that already holds the bytes (``converter.loader.stream`` hashes its
staging buffers): ``verify`` then costs almost nothing on a many-core host. The index records them
beside each shard's whole-file sha256 (``formats.index``, docs/format.md section 6), which stays for
readers that know no chunks.

Each chunk has two digests. The sha256 is the reference (and what a reader that knows nothing else
checks); the xxh3_128 (xxHash's 128-bit XXH3, ~30-50 GB/s per core against sha256's ~1.5-2) is what
``verify`` checks when the index records it and the ``xxhash`` package imports: SHA-256 of an 8B
model's 5.7 GB costs ~3 core-seconds, more than the whole GPU load, which made ``verify=True`` cost
+29-45% on an H200 host; XXH3 detects corruption (a flipped bit, a truncated or mixed-up file, a
partial download) with the same certainty for practical purposes (a random change escapes a 128-bit
digest with probability 2^-128) but is not a cryptographic hash: ``verify="sha256"`` checks the
sha256 digests instead, for a folder that must be proven not tampered with.

16 MiB chunks: a 5 GB shard has ~300 of them (enough to keep 16 threads busy to the end, ~20 KB of
JSON in the index), each hashes in ~10 ms (a pool's per-task overhead is noise), and the streamed
GPU load reads the same 16 MiB pieces into pinned staging buffers, one held per hashing reader:
10 x 16 MiB pinned with 8 readers (6 x 32 MiB without verify).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:  # releases the GIL while it hashes (python-xxhash >= 3)
    import xxhash
except ImportError:  # pragma: no cover - a declared dependency; without it, sha256 only
    xxhash = None

#: Bytes per chunk written by this version (readers take the size recorded in the index).
CHUNK_BYTES = 16 << 20
#: Allowed chunk sizes: powers of two in this range (a reader allocates buffers of this size).
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 4096, 1 << 30

_HEX = frozenset("0123456789abcdef")

#: Digest algorithms of chunks, with the hex length of one digest.
SHA256, XXH3_128 = "sha256", "xxh3_128"
_HEX_LEN = {SHA256: 64, XXH3_128: 32}


def digest_function(algo: str) -> Callable[[Any], str]:
    """bytes-like -> hex digest for ``algo`` (both release the GIL on large buffers)."""
    if algo == SHA256:
        return lambda b: hashlib.sha256(b).hexdigest()
    if algo == XXH3_128 and xxhash is not None:
        return xxhash.xxh3_128_hexdigest
    msg = f"no digest function for {algo!r} (xxh3_128 needs the xxhash package)"
    raise ValueError(msg)


def _both(block: bytes) -> tuple[str, str | None]:
    return hashlib.sha256(block).hexdigest(), xxhash.xxh3_128_hexdigest(block) if xxhash is not None else None


@dataclass(frozen=True)
class ChunkDigests:
    """The sha256 (hex) of each ``size``-byte chunk of one file, in file order, and their xxh3_128
    where the writer recorded it (indexes written before it have none)."""

    size: int
    sha256: tuple[str, ...]
    xxh3_128: tuple[str, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"size": self.size, "sha256": list(self.sha256)}
        if self.xxh3_128 is not None:
            out[XXH3_128] = list(self.xxh3_128)
        return out

    def for_verify(self, algo: str | None = None) -> tuple[str, tuple[str, ...]]:
        """(algorithm, digests) that ``verify`` checks: xxh3_128 where recorded and computable, else
        sha256; ``algo="sha256"`` forces sha256."""
        if algo != SHA256 and self.xxh3_128 is not None and xxhash is not None:
            return XXH3_128, self.xxh3_128
        return SHA256, self.sha256

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
        count = chunk_count(file_size, size)
        _check_digests(digests, SHA256, count, where)
        fast = obj.get(XXH3_128)
        if fast is not None:
            _check_digests(fast, XXH3_128, count, where)
        return cls(size, tuple(digests), tuple(fast) if fast is not None else None)

    def span(self, k: int, file_size: int) -> tuple[int, int]:
        """(offset, length) of chunk ``k`` in a file of ``file_size`` bytes."""
        start = k * self.size
        return start, min(self.size, file_size - start)


def _check_digests(digests: Any, algo: str, count: int, where: str) -> None:
    if not isinstance(digests, list) or len(digests) != count:
        got = len(digests) if isinstance(digests, list) else digests
        msg = f"{where}: chunks.{algo} must list {count} digests, got {got!r}"
        raise ValueError(msg)
    n = _HEX_LEN[algo]
    if not all(isinstance(d, str) and len(d) == n and _HEX.issuperset(d) for d in digests):
        msg = f"{where}: chunks.{algo} holds a value that is not {n} lowercase hex digits"
        raise ValueError(msg)


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


def hash_range(path: Path, offset: int, nbytes: int, algo: str = SHA256) -> str:
    """``algo`` digest (hex) of ``nbytes`` bytes of ``path`` at ``offset``, read into this thread's
    buffer."""
    buf = getattr(_buffers, "buf", None)
    if buf is None or len(buf) < nbytes:
        buf = _buffers.buf = bytearray(nbytes)
    view = memoryview(buf)[:nbytes]
    fd = os.open(path, os.O_RDONLY)
    try:
        read_exact(fd, view, offset)
    finally:
        os.close(fd)
    return digest_function(algo)(view)  # releases the GIL (more than 2 KiB)


def hash_file(path: Path, size: int | None = None, *, threads: int = 2) -> tuple[str, ChunkDigests]:
    """(whole-file sha256, chunk digests of ``size`` bytes, default ``CHUNK_BYTES``: sha256 and, with
    ``xxhash``, xxh3_128) of ``path`` in one read: the whole-file hash runs on this thread while
    ``threads`` others hash the chunks, so it takes the time of the whole-file hash alone wherever a
    core is free. At most ``threads + 1`` chunks are held at once."""
    size = size or CHUNK_BYTES
    whole = hashlib.sha256()
    futures: list[Future[tuple[str, str | None]]] = []
    in_flight: deque[Future[tuple[str, str | None]]] = deque()
    with open(path, "rb") as f, ThreadPoolExecutor(max(1, threads)) as pool:
        while True:
            block = f.read(size)  # buffered: a full chunk unless at the end of the file
            if not block:
                break
            while len(in_flight) > threads:
                in_flight.popleft().result()
            fut = pool.submit(_both, block)
            futures.append(fut)
            in_flight.append(fut)
            whole.update(block)
            if len(block) < size:
                break
        pairs = [fut.result() for fut in futures]
    fast = tuple(f for _, f in pairs) if xxhash is not None else None
    return whole.hexdigest(), ChunkDigests(size, tuple(s for s, _ in pairs), fast)


def mismatch_line(
    path: Path, chunks: ChunkDigests, file_size: int, got: Mapping[int, str], algo: str = SHA256
) -> str | None:
    """One line naming the first chunk of ``path`` whose ``algo`` digest in ``got`` differs (and how
    many do), or None when every chunk in ``got`` matches."""
    want = chunks.for_verify(algo)[1]
    bad = sorted(k for k, d in got.items() if d != want[k])
    if not bad:
        return None
    k = bad[0]
    start, n = chunks.span(k, file_size)
    more = f"; {len(bad)} of {len(want)} chunks differ" if len(bad) > 1 else ""
    return (
        f"{path}: {algo} of chunk {k} (bytes {start}-{start + n - 1}) is {got[k]}, index says {want[k]}{more}"
        f"{_held(path, k, start, n)}"
    )


#: a safetensors header longer than this is not parsed to name a damaged chunk's tensors
_HEADER_LIMIT = 100_000_000


def _held(path: Path, k: int, start: int, n: int) -> str:
    """``"; chunk 3 holds 'a', 'b' and 3 more"``: the tensors (in file order) and the header that chunk
    ``k``, the file's bytes ``start .. start + n - 1``, holds, read from the shard's header ("" where it
    cannot be read). A mismatch was named by its byte range only: finding the weight took a hex dump."""
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if not 0 < header_len <= _HEADER_LIMIT:
                return ""
            header = json.loads(f.read(header_len))
    except (OSError, ValueError):
        return ""
    if not isinstance(header, dict):
        return ""
    data_start = 8 + header_len
    held = ["the header"] if start < data_start else []
    spans = []
    for key, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) and key != "__metadata__" else None
        if isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets):
            begin, end = data_start + offsets[0], data_start + offsets[1]
            if begin < start + n and end > start:
                spans.append((begin, key))
    held += [repr(key) for _, key in sorted(spans)]
    if not held:
        return ""
    shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
    return f"; chunk {k} holds {shown}"
