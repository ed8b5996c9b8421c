"""Stream a loaded state's memory-mapped tensors to a device: each tensor byte read once, in large chunks.

``load_quantized_state`` hands out views of memory-mapped shards. Moving those one tensor at a time
(``model.to("cuda")``) faults every page of the mapping in on one thread and copies from pageable
memory through the driver's own bounce buffer. Here instead the spans of each shard that hold
tensors are cut into chunks, and several reader threads each take the next chunk, read it
(``os.preadv``, the GIL released) into one of their own staging buffers (pinned when the target is
CUDA) and issue the copies of the tensor bytes inside it into their final device tensors
(``non_blocking`` from pinned memory, on the reader's own CUDA stream, so they overlap the next
reads). A staging buffer is refilled only after its copies are done. No chunk waits for an earlier
one, and the calling thread only waits for the readers.

With ``verify`` (``hashes``, a running ``formats.index.Verification``), a shard whose index records
chunk digests is read on its chunk grid instead, the whole file (header and gaps are a few bytes
more), and a reader hashes the chunk it just read into staging (no second read;
``formats/chunks.py``), unless the verification's own threads, which work from the end of the files
backwards, started that chunk first: those finish what the readers do not reach while the model is
built.

Each destination is its own ``torch.empty`` on the device, as ``model.to(device)`` would make it (same
alignment, independently freeable). Tensors that are not views of a shard (computed, cast, cloned)
are moved with ``.to(device)``. The returned state has the same keys and records (dataclasses with
their tensor fields replaced), so everything downstream builds the model from device tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from converter.errors import CorruptFileError
from converter.loader import timing
from formats.chunks import read_exact

if TYPE_CHECKING:
    from formats.index import Verification

#: Bytes per read / staging buffer: large enough for efficient DMA and preadv, small enough that the
#: first read starts soon (pinning costs a few ms per 16 MiB) and that a slow chunk holds little back.
#: The chunk digests' default grid (formats/chunks.py), which a verified load reads on.
CHUNK_BYTES = 16 << 20
#: Staging buffers in all (``SLOTS * CHUNK_BYTES`` = 256 MiB pinned at most), shared out among the
#: readers: two each, one being read into while the copies from the other run.
SLOTS = 16
#: Reader threads at most: a few saturate the page cache and the copy engine. With verify they also
#: hash what they read, beside the verification's own threads (every core but the caller's, for the
#: whole load: ``converter.loader.state._hash_threads``).
READERS = 8
#: Tensors of more than this many bytes come from the CUDA caching allocator's large pool
#: (``kSmallSize`` in c10/cuda/CUDACachingAllocator.cpp), which one reserved segment can serve.
LARGE_POOL_MIN = 1 << 20
ALLOC_GRANULE = 512


def reserve_device_memory(device: torch.device, sizes: Sequence[int]) -> bool:
    """Make the CUDA caching allocator hold one segment big enough for the ``sizes`` (bytes) of the
    large tensors about to be allocated, so that they are carved from it instead of each costing a
    ``cudaMalloc`` (hundreds of them for an 8B model). The tensors stay separate allocations; the
    segment returns to the driver as before (``torch.cuda.empty_cache`` once all of them are freed).
    transformers does the same before loading (``caching_allocator_warmup``). Returns whether the
    segment was made (False: not CUDA, nothing large, or not enough free memory in one piece)."""
    total = sum(-(-n // ALLOC_GRANULE) * ALLOC_GRANULE for n in sizes if n > LARGE_POOL_MIN)
    if device.type != "cuda" or not total:
        return False
    try:
        torch.empty(total, dtype=torch.uint8, device=device)  # freed at once: back to the cache
    except torch.OutOfMemoryError:  # the tensors themselves may still fit in separate pieces
        return False
    return True


def reader_threads() -> int:
    """How many threads read (and, with verify, hash) the shards."""
    return max(2, min(READERS, len(os.sched_getaffinity(0))))


@dataclass
class MappedFile:
    """A shard file and the address range of its memory map in this process."""

    path: Path
    base: int  # address of file byte 0 in the mapping
    size: int  # file size in bytes


@dataclass
class _Piece:
    """``nbytes`` bytes of a file at ``offset`` that go to the flat byte view ``dst``."""

    offset: int
    nbytes: int
    dst: torch.Tensor  # uint8, flat, on the device


@dataclass
class StreamStats:
    """What a stream did (the tests check that each file is read once)."""

    bytes_read: dict[Path, int] = field(default_factory=dict)
    copied_tensors: int = 0
    moved_tensors: int = 0  # not shard views: moved with .to(device)


def mapped_files(shards: Sequence[Any]) -> list[MappedFile]:
    """``MappedFile`` of each ``formats.reader.Shard`` (its copy-on-write mapping); empty files and
    shards without a mapping (a Hub header's) are skipped."""
    out = []
    for shard in shards:
        mm = shard.mapped_bytes()
        if mm is not None and mm.size:
            out.append(MappedFile(Path(shard.path), int(mm.ctypes.data), int(mm.size)))
    return out


def _tensors_of(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [t for f in dataclasses.fields(value) for t in _tensors_of(getattr(value, f.name))]
    return []


def _replace(value: Any, moved: Mapping[int, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return moved[id(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {
            f.name: _replace(getattr(value, f.name), moved)
            for f in dataclasses.fields(value)
            if f.init and _tensors_of(getattr(value, f.name))
        }
        return dataclasses.replace(value, **changes) if changes else value
    return value


def _locate(t: torch.Tensor, files: Sequence[MappedFile]) -> tuple[int, int] | None:
    """(file index, file offset) when ``t`` is a contiguous view lying wholly inside one mapping."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
        return None
    ptr, nbytes = t.data_ptr(), t.numel() * t.element_size()
    for i, f in enumerate(files):
        if f.base <= ptr and ptr + nbytes <= f.base + f.size:
            return i, ptr - f.base
    return None


def stream_state(
    state: Mapping[str, Any],
    files: Sequence[MappedFile],
    device: str | torch.device,
    *,
    chunk_bytes: int = CHUNK_BYTES,
    slots: int = SLOTS,
    readers: int | None = None,
    stats: StreamStats | None = None,
    hashes: Verification | None = None,
    while_reading: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """``state`` with every tensor (plain or inside a record) on ``device``.

    Shard views are read from their files chunk by chunk and copied once; other tensors are moved
    with ``.to(device)``. ``hashes``: shards with chunk digests are hashed as they are read.
    ``while_reading`` runs on the calling thread once the readers have started, instead of idle waiting.
    """
    device = torch.device(device)
    stats = stats if stats is not None else StreamStats()
    moved: dict[int, torch.Tensor] = {}
    by_view: dict[tuple, torch.Tensor] = {}  # one destination per (address, dtype, shape)
    pieces: list[list[_Piece]] = [[] for _ in files]
    tensors = [t for value in state.values() for t in _tensors_of(value)]
    located = [_locate(t, files) for t in tensors]
    # One destination per shard view: views of the same bytes, dtype and shape share it.
    keys = [
        None if w is None else (t.data_ptr(), t.dtype, tuple(t.shape))
        for t, w in zip(tensors, located, strict=True)
    ]
    with timing.phase("reserve"):
        views = {key: t for t, key in zip(tensors, keys, strict=True) if key is not None}
        reserve_device_memory(device, [t.numel() * t.element_size() for t in views.values()])
    alloc_start = time.perf_counter()
    for t, where, key in zip(tensors, located, keys, strict=True):
        if id(t) in moved:
            continue
        if where is None:
            moved[id(t)] = t.to(device)
            stats.moved_tensors += 1
            continue
        if key not in by_view:
            dst = torch.empty(t.shape, dtype=t.dtype, device=device)
            by_view[key] = dst
            flat = dst.reshape(-1).view(torch.uint8)
            pieces[where[0]].append(_Piece(where[1], flat.numel(), flat))
            stats.copied_tensors += 1
        moved[id(t)] = by_view[key]
    timing.add("alloc", time.perf_counter() - alloc_start)
    grids = [hashes.chunk_digests(f.path.name) if hashes is not None else None for f in files]
    chunks = _chunks(files, pieces, chunk_bytes, grids)
    _copy_files(files, chunks, device, slots, readers, stats, hashes, while_reading)
    return {k: _replace(v, moved) for k, v in state.items()}


def _inside(ordered: list[_Piece], k: int, off: int, n: int) -> tuple[int, list[_Piece]]:
    """(first piece that may overlap later chunks, the pieces overlapping ``[off, off + n)``)."""
    while k < len(ordered) and ordered[k].offset + ordered[k].nbytes <= off:
        k += 1
    inside = []
    j = k
    while j < len(ordered) and ordered[j].offset < off + n:
        inside.append(ordered[j])
        j += 1
    return k, inside


def _chunks(
    files: Sequence[MappedFile], pieces: Sequence[list[_Piece]], size: int, grids: Sequence[Any] = ()
) -> list:
    """(file index, offset, length, pieces overlapping it, chunk to hash or -1) for every chunk to read,
    files in turn.

    Tensor ranges are merged into spans (a gap shorter than a chunk is read through rather than
    split), and each span is cut into chunks of at most ``size`` bytes. A file with chunk digests
    (``Verification.chunk_digests``: digests, file size) is read whole on their grid instead, each
    chunk's index given to hash it.
    """
    out = []
    for i in range(len(files)):
        ordered = sorted(pieces[i], key=lambda p: p.offset)
        grid = grids[i] if i < len(grids) else None
        if grid is not None:
            digests, file_size = grid
            k = 0
            for c in range(len(digests.sha256)):
                off, n = digests.span(c, file_size)
                k, inside = _inside(ordered, k, off, n)
                out.append((i, off, n, inside, c))
            continue
        spans: list[tuple[int, int]] = []
        for p in ordered:
            if spans and p.offset <= spans[-1][1] + size:
                spans[-1] = (spans[-1][0], max(spans[-1][1], p.offset + p.nbytes))
            else:
                spans.append((p.offset, p.offset + p.nbytes))
        k = 0
        for start, end in spans:
            for off in range(start, end, size):
                n = min(size, end - off)
                k, inside = _inside(ordered, k, off, n)
                out.append((i, off, n, inside, -1))
    return out


def _copy_files(
    files: Sequence[MappedFile],
    chunks: list,
    device: torch.device,
    slots: int,
    readers: int | None,
    stats: StreamStats,
    hashes: Verification | None,
    while_reading: Callable[[], None] | None = None,
) -> None:
    """Each reader thread takes the next chunk, reads it into one of its own staging buffers, issues
    the copies of its tensor pieces on its own CUDA stream and goes on to the next chunk; a buffer is
    refilled once the copies from it are done (its event). The calling thread only waits for them:
    no chunk waits for an earlier one (the copies land in disjoint device ranges, in any order), and
    the Python of the copies runs on the readers, between their reads (which release the GIL)."""
    if not chunks:
        return
    cuda = device.type == "cuda"
    largest = max(n for _, _, n, _, _ in chunks)
    workers = max(1, min(readers or reader_threads(), slots, len(chunks)))
    per_reader = max(1, slots // workers)  # staging buffers of each reader: slots in all at most
    timed = timing.active()  # per-thread sums below only when someone reads them
    fds = [os.open(f.path, os.O_RDONLY) for f in files]
    order = iter(range(len(chunks)))
    lock = threading.Lock()
    failed = threading.Event()  # one reader failed: the others stop at their next chunk

    def next_chunk() -> int | None:
        with lock:
            return None if failed.is_set() else next(order, None)

    def work() -> None:
        try:
            _work()
        except BaseException:
            failed.set()
            raise

    def _work() -> None:
        # Its own stream: a buffer's event then waits for this reader's copies only.
        copy_stream = torch.cuda.Stream(device) if cuda else None
        staging: list[torch.Tensor] = []
        views: list[memoryview] = []
        done: list[Any] = [None] * per_reader  # per buffer: the event of its last copies
        turn = 0
        with torch.cuda.stream(copy_stream) if cuda else contextlib.nullcontext():
            while (j := next_chunk()) is not None:
                slot = turn % per_reader
                turn += 1
                t0 = time.perf_counter()
                if slot == len(staging):  # pinned on first use (cudaHostAlloc: ms), beside the other readers
                    staging.append(torch.empty(largest, dtype=torch.uint8, pin_memory=cuda))
                    views.append(memoryview(staging[-1].numpy()))
                    if timed:
                        timing.add("staging_cpu", time.perf_counter() - t0)
                elif done[slot] is not None:
                    done[slot].synchronize()  # releases the GIL
                    if timed:
                        timing.add("slot_wait_cpu", time.perf_counter() - t0)
                t1 = time.perf_counter()
                i, off, n, inside, c = chunks[j]
                try:
                    read_exact(fds[i], views[slot][:n], off)
                except OSError as exc:  # e.g. the file shrank since it was parsed: name it
                    msg = f"{files[i].path}: reading {n} bytes at offset {off} failed ({exc})"
                    raise CorruptFileError(msg) from exc
                t2 = time.perf_counter()
                name = files[i].path.name
                if c >= 0 and hashes is not None and hashes.take(name, c):  # the hash releases the GIL
                    hashes.record(name, c, hashes.chunk_hasher(name)(views[slot][:n]))
                    if timed:
                        timing.add("hashed_by_readers", 1)
                t3 = time.perf_counter()
                src = staging[slot]
                for p in inside:
                    lo, hi = max(p.offset, off), min(p.offset + p.nbytes, off + n)
                    if lo >= hi:  # an overlapping view that ends before this chunk
                        continue
                    p.dst[lo - p.offset : hi - p.offset].copy_(src[lo - off : hi - off], non_blocking=cuda)
                if cuda:
                    done[slot] = torch.cuda.Event()
                    done[slot].record(copy_stream)
                with lock:
                    stats.bytes_read[files[i].path] = stats.bytes_read.get(files[i].path, 0) + n
                if timed:
                    timing.add("read_cpu", t2 - t1)
                    timing.add("hash_cpu", t3 - t2)
                    timing.add("copy_issue_cpu", time.perf_counter() - t3)
            if copy_stream is not None:
                copy_stream.synchronize()  # before its buffers are freed; releases the GIL

    try:
        timing.mark("reads_start_at")
        with ThreadPoolExecutor(workers) as pool:
            jobs = [pool.submit(work) for _ in range(workers)]
            try:
                if while_reading is not None:
                    with timing.phase("while_reading"):
                        while_reading()
            finally:  # the readers end (or fail) before anything is raised: their buffers are in use
                with timing.phase("read_wait"):
                    for job in jobs:
                        job.result()
        timing.add("chunks", len(chunks))
        timing.add("readers", workers)
        timing.mark("copies_done_at")
    finally:
        for fd in fds:
            os.close(fd)
