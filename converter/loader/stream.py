"""Stream a loaded state's memory-mapped tensors to a device: each shard read once, hashed on the way.

``load_quantized_state`` hands out views of memory-mapped shards. Moving those one tensor at a time
(``model.to("cuda")``) faults every page of the mapping in on one thread and copies from pageable
memory through the driver's own bounce buffer; checking the sha256 first reads every byte a second
time. Here instead each shard file is read in large chunks (``os.preadv``, several reader threads,
the GIL released) into a few staging buffers (pinned when the target is CUDA), every chunk is fed to
the shard's sha256 in file order on a hashing thread, and the byte ranges of the tensors inside the
chunk are copied into their final device tensors (``non_blocking`` from pinned memory, so the copies
overlap the next reads). A staging buffer is reused only after its copies and its hash are done.

Each destination is its own ``torch.empty`` on the device, as ``model.to(device)`` would make it (same
alignment, independently freeable). Tensors that are not views of a shard (computed, cast, cloned)
are moved with ``.to(device)``. The returned state has the same keys and records (dataclasses with
their tensor fields replaced), so everything downstream builds the model from device tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

#: Bytes per read / staging buffer: large enough for efficient DMA and preadv, small enough that a
#: few of them (pinned) cost little to allocate.
CHUNK_BYTES = 32 << 20
#: Staging buffers in flight (reads ahead of the copies).
SLOTS = 6


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
    sha256: dict[Path, str] = field(default_factory=dict)
    copied_tensors: int = 0
    moved_tensors: int = 0  # not shard views: moved with .to(device)


def mapped_files(shards: Sequence[Any]) -> list[MappedFile]:
    """``MappedFile`` of each ``formats.reader.Shard`` (its np.memmap); empty files are skipped."""
    out = []
    for shard in shards:
        mm = getattr(shard, "_map", None)
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


def _read_exact(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            msg = f"unexpected end of file at byte {offset + done}"
            raise OSError(msg)
        done += got


def stream_state(
    state: Mapping[str, Any],
    files: Sequence[MappedFile],
    device: str | torch.device,
    *,
    hash_files: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
    slots: int = SLOTS,
    readers: int | None = None,
    stats: StreamStats | None = None,
) -> dict[str, Any]:
    """``state`` with every tensor (plain or inside a record) on ``device``.

    Shard views are read from their files chunk by chunk and copied once; with ``hash_files`` every
    file is read whole and its sha256 lands in ``stats.sha256`` (the caller compares it with the
    index: nothing is checked here).
    """
    device = torch.device(device)
    stats = stats if stats is not None else StreamStats()
    moved: dict[int, torch.Tensor] = {}
    by_view: dict[tuple, torch.Tensor] = {}  # one destination per (address, dtype, shape)
    pieces: list[list[_Piece]] = [[] for _ in files]
    for value in state.values():
        for t in _tensors_of(value):
            if id(t) in moved:
                continue
            where = _locate(t, files)
            if where is None:
                moved[id(t)] = t.to(device)
                stats.moved_tensors += 1
                continue
            key = (t.data_ptr(), t.dtype, tuple(t.shape))
            if key not in by_view:
                dst = torch.empty(t.shape, dtype=t.dtype, device=device)
                by_view[key] = dst
                flat = dst.reshape(-1).view(torch.uint8)
                pieces[where[0]].append(_Piece(where[1], flat.numel(), flat))
                stats.copied_tensors += 1
            moved[id(t)] = by_view[key]
    _copy_files(files, pieces, device, hash_files, chunk_bytes, slots, readers, stats)
    return {k: _replace(v, moved) for k, v in state.items()}


def _chunks(files: Sequence[MappedFile], pieces: Sequence[list[_Piece]], whole: bool, size: int) -> list:
    """(file index, offset, length, pieces overlapping it) for every chunk to read, in file order.

    ``whole``: every byte of every file (for its hash); else only the spans that hold tensors.
    """
    out = []
    for i, f in enumerate(files):
        ordered = sorted(pieces[i], key=lambda p: p.offset)
        if whole:
            spans = [(0, f.size)]
        else:  # merge tensor ranges; gaps under a chunk are read through rather than split
            spans = []
            for p in ordered:
                if spans and p.offset <= spans[-1][1] + size:
                    spans[-1] = (spans[-1][0], max(spans[-1][1], p.offset + p.nbytes))
                else:
                    spans.append((p.offset, p.offset + p.nbytes))
        k = 0
        for start, end in spans:
            for off in range(start, end, size):
                n = min(size, end - off)
                while k < len(ordered) and ordered[k].offset + ordered[k].nbytes <= off:
                    k += 1
                inside = []
                j = k
                while j < len(ordered) and ordered[j].offset < off + n:
                    inside.append(ordered[j])
                    j += 1
                out.append((i, off, n, inside))
    return _interleave(out, len(files))


def _interleave(chunks: list, n_files: int) -> list:
    """Chunks round-robin over the files (each file's own chunks still in order), so that every
    file's sha256, sequential by nature, runs at the same time as the others'."""
    per_file: list[list] = [[] for _ in range(n_files)]
    for c in chunks:
        per_file[c[0]].append(c)
    out = []
    for k in range(max((len(c) for c in per_file), default=0)):
        out += [c[k] for c in per_file if k < len(c)]
    return out


def _copy_files(
    files: Sequence[MappedFile],
    pieces: Sequence[list[_Piece]],
    device: torch.device,
    hash_files: bool,
    chunk_bytes: int,
    slots: int,
    readers: int | None,
    stats: StreamStats,
) -> None:
    chunks = _chunks(files, pieces, hash_files, chunk_bytes)
    if not chunks:
        return
    cuda = device.type == "cuda"
    largest = max(n for _, _, n, _ in chunks)
    slots = max(1, min(max(slots, min(2 * len(files), 16) if hash_files else 0), len(chunks)))
    staging = [torch.empty(largest, dtype=torch.uint8, pin_memory=cuda) for _ in range(slots)]
    views = [memoryview(s.numpy()) for s in staging]
    hashers = [hashlib.sha256() for _ in files] if hash_files else []
    # One hashing thread per file (hashlib releases the GIL): the shards' hashes run in parallel,
    # each fed its own chunks in file order.
    hash_pools = [ThreadPoolExecutor(1) for _ in hashers]
    fds = [os.open(f.path, os.O_RDONLY) for f in files]
    # Per slot: what must finish before the slot is refilled (its copies' event, its hash update).
    done_copy: list[Any] = [None] * slots
    done_hash: list[Future | None] = [None] * slots
    lock = threading.Lock()
    workers = readers or max(2, min(8, len(os.sched_getaffinity(0))))
    try:
        with ThreadPoolExecutor(workers) as pool:

            def read(j: int, slot: int) -> None:
                with lock:
                    event, hashed = done_copy[slot], done_hash[slot]
                if event is not None:
                    event.synchronize()  # releases the GIL
                if hashed is not None:
                    hashed.result()
                i, off, n, _ = chunks[j]
                _read_exact(fds[i], views[slot][:n], off)

            reads = {j: pool.submit(read, j, j % slots) for j in range(slots)}
            for j, (i, off, n, inside) in enumerate(chunks):
                slot = j % slots
                reads.pop(j).result()
                stats.bytes_read[files[i].path] = stats.bytes_read.get(files[i].path, 0) + n
                hashed = hash_pools[i].submit(hashers[i].update, views[slot][:n]) if hash_files else None
                src = staging[slot]
                for p in inside:
                    lo, hi = max(p.offset, off), min(p.offset + p.nbytes, off + n)
                    if lo >= hi:  # an overlapping view that ends before this chunk
                        continue
                    p.dst[lo - p.offset : hi - p.offset].copy_(src[lo - off : hi - off], non_blocking=cuda)
                event = None
                if cuda:  # the copies run on the destination device's current stream
                    event = torch.cuda.Event()
                    event.record(torch.cuda.current_stream(device))
                with lock:
                    done_copy[slot], done_hash[slot] = event, hashed
                if j + slots < len(chunks):
                    reads[j + slots] = pool.submit(read, j + slots, slot)
            for h in done_hash:
                if h is not None:
                    h.result()
        if cuda:
            torch.cuda.current_stream(device).synchronize()
    finally:
        for hash_pool in hash_pools:
            hash_pool.shutdown()
        for fd in fds:
            os.close(fd)
    for i, f in enumerate(files):
        if hash_files:
            stats.sha256[f.path] = hashers[i].hexdigest()
