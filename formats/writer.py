"""Streaming safetensors shard writer: an explicit state machine, one tensor in memory at a time.

The header is laid out from the plan (the slots) before any data: fixed-size slots sit at fixed
offsets after a reserved header, ordered by descending dtype alignment then name, so every tensor is
aligned to its item size; variable-length U8 blobs (the quant-state JSON, whose length is known only
after quantizing) are kept until ``close`` and appended after the fixed slots in name order. The
real header is written at close, padded with spaces to the reserved size (a multiple of 8; readers
accept trailing whitespace after the JSON). The file lives under a temp name in the same folder
(``.<name>.partial``) until it is complete, fsynced and renamed; the same inputs give the same bytes.

A fixed slot may also be written in parts (``write_part``: bytes at an offset inside it, in any
order, each byte once), so that a tensor too large to hold whole (a fused MoE experts tensor) is
written a block at a time; ``close`` refuses a slot whose parts do not cover it.

States::

    OPEN --write()* / write_part()*--> OPEN --close()--> FINALIZING --> CLOSED
      \\------------------- abort() / any failure -----> ABORTED
"""

from __future__ import annotations

import bisect
import enum
import json
import math
import os
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from formats.chunks import ChunkDigests, hash_file
from formats.validate import (
    DTYPES,
    MAX_HEADER_SIZE,
    DuplicateWrite,
    FormatError,
    HeaderTooLarge,
    MissingSlots,
    SlotMismatch,
    UnknownDtype,
    UnknownSlot,
    WriterStateError,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

#: safetensors dtype code -> torch attribute name (the codes ``safetensors.torch`` knows).
TORCH_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "F16": "float16",
    "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "I64": "int64", "U64": "uint64",
    "F64": "float64", "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
}  # fmt: skip


#: safetensors dtype code -> numpy dtype name, where numpy has one (no bf16 / fp8 in numpy).
NUMPY_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "<i2", "U16": "<u2", "F16": "<f2",
    "I32": "<i4", "U32": "<u4", "F32": "<f4", "I64": "<i8", "U64": "<u8", "F64": "<f8", "C64": "<c8",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    """``TORCH_DTYPES`` (code -> torch dtype), ``DTYPE_CODES`` (torch dtype -> code) and
    ``NUMPY_DTYPES`` (code -> numpy dtype), built on first use: writing numpy arrays or bytes never
    imports torch (the converter's CPU path), and reading a folder (``inspect``, ``verify``, the
    loader's index) never imports numpy."""
    if name in globals():  # called directly below, after the first build
        return globals()[name]
    if name in ("TORCH_DTYPES", "DTYPE_CODES"):
        import torch

        torch_dtypes = {code: getattr(torch, attr) for code, attr in TORCH_NAMES.items()}
        globals()["TORCH_DTYPES"] = torch_dtypes
        globals()["DTYPE_CODES"] = {v: k for k, v in torch_dtypes.items()}
        return globals()[name]
    if name == "NUMPY_DTYPES":
        import numpy as np

        globals()[name] = {code: np.dtype(numpy_name) for code, numpy_name in NUMPY_NAMES.items()}
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")  # noqa: EM102


_PLACEHOLDER_OFFSET = 10**19 - 1  # more digits than any real offset: reserves header room for blobs


@dataclass(frozen=True)
class TensorSlot:
    name: str
    dtype: str  # safetensors dtype code: "U8", "I8", "F32", "F16", "BF16", "I64", "I32", "BOOL", ...
    shape: tuple[int, ...] | None  # None: a 1-D U8 blob whose length is known only when written

    @property
    def nbytes(self) -> int | None:
        return None if self.shape is None else math.prod(self.shape) * DTYPES[self.dtype]


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    sha256: str
    size: int
    chunks: ChunkDigests | None = None  # per-chunk sha256 (formats/chunks.py)


class WriterState(enum.Enum):
    OPEN = "open"  # temp file created, header room reserved, accepting writes
    FINALIZING = "finalizing"  # close() running: blobs, header, fsync, rename
    CLOSED = "closed"  # the final file is in place
    ABORTED = "aborted"  # the temp file is gone


def temp_path(path: Path) -> Path:
    """Where a shard lives until it is complete: a hidden ``.partial`` name in the same folder."""
    return path.with_name(f".{path.name}.partial")


def _as_bytes(
    slot: TensorSlot,
    data: torch.Tensor | np.ndarray | bytes | bytearray | memoryview,
    *,
    whole: bool = True,
) -> memoryview:
    """A flat byte view of ``data`` after checking its dtype and (``whole``: a write of the whole slot)
    element count against ``slot``."""
    where = f"tensor {slot.name!r}"
    count = None if slot.shape is None or not whole else math.prod(slot.shape)
    torch = sys.modules.get("torch")  # a torch tensor can only be passed once torch is imported
    if torch is not None and isinstance(data, torch.Tensor):
        want = __getattr__("TORCH_DTYPES").get(slot.dtype)
        if data.dtype != want:
            msg = f"{where}: dtype {data.dtype} written to a {slot.dtype} slot (expected {want})"
            raise SlotMismatch(msg)
        if count is not None and data.numel() != count:
            msg = f"{where}: {data.numel()} elements written, the plan says shape {list(slot.shape or ())}"
            raise SlotMismatch(msg)
        if slot.shape is None and whole and data.dim() != 1:
            msg = f"{where}: blob must be a 1-D U8 tensor, got shape {list(data.shape)}"
            raise SlotMismatch(msg)
        flat = data.detach().to("cpu").contiguous().reshape(-1)
        return memoryview(flat.view(torch.uint8).numpy()).cast("B")
    np = sys.modules.get("numpy")  # likewise a numpy array
    if np is not None and isinstance(data, np.ndarray):
        want_np = __getattr__("NUMPY_DTYPES").get(slot.dtype)
        if want_np is None or data.dtype.newbyteorder("<") != want_np or data.dtype.byteorder == ">":
            msg = f"{where}: numpy dtype {data.dtype} written to a {slot.dtype} slot (expected {want_np})"
            raise SlotMismatch(msg)
        if count is not None and data.size != count:
            msg = f"{where}: {data.size} elements written, the plan says shape {list(slot.shape or ())}"
            raise SlotMismatch(msg)
        return memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8)).cast("B")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return memoryview(data).cast("B")
    msg = f"{where}: cannot write a {type(data).__name__}; pass a torch.Tensor, numpy array or bytes"
    raise SlotMismatch(msg)


def _digests_into(path: Path, chunk_bytes: int | None, out: dict) -> None:
    """(sha256, chunk digests) of the file at ``path`` into out["digests"] (or the exception, for the
    caller to raise). One read: the chunk digests are hashed on other threads meanwhile."""
    try:
        out["digests"] = hash_file(path, chunk_bytes)
    except BaseException as exc:  # handed to the closing thread, which raises it
        out["digests"] = exc


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    while buf:
        written = os.pwrite(fd, buf[: 1 << 30], offset)
        buf = buf[written:]
        offset += written


@contextmanager
def naming_os_errors(path: Path) -> Iterator[None]:
    """Give an ``OSError`` raised without a file name the name ``path``.

    Calls on a file descriptor (``pwrite``, ``ftruncate``, ``fsync``, a file object's ``write``) raise
    errors such as ENOSPC or EFBIG without naming the file; users need to know which one failed.
    """
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


class ShardWriter:
    """Write one safetensors shard from a plan; see the module docstring for layout and states."""

    def __init__(
        self,
        path: Path,
        slots: Sequence[TensorSlot],
        metadata: Mapping[str, str],
        *,
        chunk_bytes: int | None = None,
    ) -> None:
        self.path = Path(path)
        self._chunk_bytes = chunk_bytes  # per-chunk sha256; None: formats.chunks.CHUNK_BYTES
        self.info: ShardInfo | None = None
        self._state = WriterState.ABORTED  # until the temp file exists
        where = str(self.path)
        for key, value in metadata.items():
            if not key.startswith("quantize_model.") or not isinstance(value, str):
                msg = f"{where}: metadata {key!r} must be a 'quantize_model.*' key with a string value"
                raise FormatError(msg)
        self._metadata = {"format": "pt", **{k: metadata[k] for k in sorted(metadata)}}
        self._slots: dict[str, TensorSlot] = {}
        for s in slots:
            if s.name in self._slots or s.name == "__metadata__" or not s.name:
                msg = f"{where}: tensor name {s.name!r} is empty, reserved or planned twice"
                raise FormatError(msg)
            if s.dtype not in DTYPES:
                msg = (
                    f"{where}: tensor {s.name!r}: unknown dtype {s.dtype!r}; expected one of {sorted(DTYPES)}"
                )
                raise UnknownDtype(msg)
            if s.shape is None and s.dtype != "U8":
                msg = f"{where}: tensor {s.name!r}: a variable-length slot must be U8, got {s.dtype}"
                raise FormatError(msg)
            if s.shape is not None and any(not isinstance(d, int) or d < 0 for d in s.shape):
                msg = f"{where}: tensor {s.name!r}: shape {s.shape!r} must be non-negative integers"
                raise FormatError(msg)
            self._slots[s.name] = s
        fixed = sorted((s for s in slots if s.shape is not None), key=lambda s: (-DTYPES[s.dtype], s.name))
        self._offsets: dict[str, tuple[int, int]] = {}
        position = 0
        for s in fixed:
            assert s.nbytes is not None
            self._offsets[s.name] = (position, position + s.nbytes)
            position += s.nbytes
        self._fixed_end = position
        self._blob_names = sorted(s.name for s in slots if s.shape is None)
        self._blobs: dict[str, bytes] = {}
        self._written: set[str] = set()
        #: slots written in parts so far (not yet whole): name -> sorted disjoint byte spans [start, end)
        self._parts: dict[str, list[tuple[int, int]]] = {}
        placeholder = {name: (_PLACEHOLDER_OFFSET, _PLACEHOLDER_OFFSET) for name in self._blob_names}
        self._header_size = -(-len(self._header_json(placeholder)) // 8) * 8
        if self._header_size > MAX_HEADER_SIZE:
            msg = f"{where}: header of {self._header_size} bytes exceeds {MAX_HEADER_SIZE}; split the shard"
            raise HeaderTooLarge(msg)
        self._data_start = 8 + self._header_size
        self._tmp = temp_path(self.path)
        self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._state = WriterState.OPEN
        try:
            with naming_os_errors(self.path):
                os.ftruncate(self._fd, self._data_start + self._fixed_end)
        except BaseException:
            self.abort()
            raise

    @property
    def state(self) -> WriterState:
        return self._state

    def _expect(self, state: WriterState, step: str) -> None:
        if self._state is not state:
            msg = f"{self.path}: {step}() needs state {state.value}, the writer is {self._state.value}"
            raise WriterStateError(msg)

    def _header_json(self, blob_offsets: Mapping[str, tuple[int, int]]) -> bytes:
        header: dict[str, object] = {"__metadata__": self._metadata}
        spans = {**self._offsets, **blob_offsets}
        for name in sorted(spans, key=lambda n: spans[n]):
            s = self._slots[name]
            shape = list(s.shape) if s.shape is not None else [spans[name][1] - spans[name][0]]
            header[name] = {"dtype": s.dtype, "shape": shape, "data_offsets": list(spans[name])}
        return json.dumps(header, separators=(",", ":")).encode("utf-8")

    def write(self, name: str, data: torch.Tensor | np.ndarray | bytes | memoryview) -> None:
        """Write one planned tensor (any order, each exactly once)."""
        self._expect(WriterState.OPEN, "write")
        slot = self._slots.get(name)
        if slot is None:
            msg = f"{self.path}: tensor {name!r} is not in this shard's plan"
            raise UnknownSlot(msg)
        if name in self._written:
            msg = f"{self.path}: tensor {name!r} written twice"
            raise DuplicateWrite(msg)
        if name in self._parts:
            msg = f"{self.path}: tensor {name!r} written whole after parts of it (write_part)"
            raise DuplicateWrite(msg)
        buf = _as_bytes(slot, data)
        if slot.shape is None:
            self._blobs[name] = bytes(buf)
        else:
            if buf.nbytes != slot.nbytes:
                msg = f"{self.path}: tensor {name!r}: {buf.nbytes} bytes written, the plan says {slot.nbytes}"
                raise SlotMismatch(msg)
            with naming_os_errors(self.path):
                _pwrite_all(self._fd, buf, self._data_start + self._offsets[name][0])
        self._written.add(name)

    def write_part(
        self, name: str, byte_offset: int, data: torch.Tensor | np.ndarray | bytes | memoryview
    ) -> None:
        """Write part of one planned fixed-size tensor: ``data``'s bytes (its elements in C order, of the
        slot's dtype) at ``byte_offset`` from the tensor's start. Parts may come in any order; each byte
        of the slot is written once (a part outside the slot, overlapping another or on a tensor written
        with ``write`` is refused), and the tensor counts as written once its parts cover it."""
        self._expect(WriterState.OPEN, "write_part")
        slot = self._slots.get(name)
        if slot is None:
            msg = f"{self.path}: tensor {name!r} is not in this shard's plan"
            raise UnknownSlot(msg)
        if slot.shape is None or slot.nbytes is None:
            msg = f"{self.path}: tensor {name!r} is a variable-length blob: write it whole (write)"
            raise SlotMismatch(msg)
        if name in self._written:
            msg = f"{self.path}: tensor {name!r} written twice (a part after it was written whole)"
            raise DuplicateWrite(msg)
        if not isinstance(byte_offset, int) or isinstance(byte_offset, bool):
            msg = f"{self.path}: tensor {name!r}: byte_offset must be an int, not {byte_offset!r}"
            raise TypeError(msg)
        buf = _as_bytes(slot, data, whole=False)
        start, end, size = byte_offset, byte_offset + buf.nbytes, slot.nbytes
        if start < 0 or end > size:
            msg = (
                f"{self.path}: tensor {name!r}: part of {buf.nbytes} bytes at offset {byte_offset!r} lies "
                f"outside its {size} bytes"
            )
            raise SlotMismatch(msg)
        if start % DTYPES[slot.dtype] or buf.nbytes % DTYPES[slot.dtype]:
            msg = (
                f"{self.path}: tensor {name!r}: part of {buf.nbytes} bytes at offset {start} does not "
                f"start and end on {slot.dtype} elements ({DTYPES[slot.dtype]} bytes)"
            )
            raise SlotMismatch(msg)
        spans = self._parts.setdefault(name, [])
        i = bisect.bisect_left(spans, (start, end))
        before = spans[i - 1] if i else None
        after = spans[i] if i < len(spans) else None
        if start < end and (
            (before is not None and before[1] > start) or (after is not None and after[0] < end)
        ):
            other = before if before is not None and before[1] > start else after
            assert other is not None
            msg = (
                f"{self.path}: tensor {name!r}: part [{start}, {end}) overlaps the part "
                f"[{other[0]}, {other[1]}) already written"
            )
            raise DuplicateWrite(msg)
        if start < end:
            with naming_os_errors(self.path):
                _pwrite_all(self._fd, buf, self._data_start + self._offsets[name][0] + start)
            # merged with its neighbours where they touch: one span once the slot is whole
            if before is not None and before[1] == start:
                start = spans.pop(i - 1)[0]
                i -= 1
            if after is not None and after[0] == end:
                end = spans.pop(i)[1]
            spans.insert(i, (start, end))
        if spans == [(0, size)] or size == 0:
            del self._parts[name]
            self._written.add(name)

    def close(self) -> ShardInfo:
        """Append the blobs, write the header, fsync, rename into place, fsync the folder."""
        self._expect(WriterState.OPEN, "close")
        partial = sorted(self._parts)
        if partial:
            shown = ", ".join(
                f"{m!r} ({sum(b - a for a, b in self._parts[m])} of {self._slots[m].nbytes} bytes)"
                for m in partial[:10]
            ) + (" ..." if len(partial) > 10 else "")
            msg = f"{self.path}: {len(partial)} planned tensor(s) only partly written: {shown}"
            raise MissingSlots(msg)
        missing = sorted(set(self._slots) - self._written)
        if missing:
            shown = ", ".join(repr(m) for m in missing[:10]) + (" ..." if len(missing) > 10 else "")
            msg = f"{self.path}: {len(missing)} planned tensor(s) never written: {shown}"
            raise MissingSlots(msg)
        self._state = WriterState.FINALIZING
        try:
            with naming_os_errors(self.path):
                sha, chunks, size = self._finish()
        except BaseException:
            self.abort()
            raise
        self._state = WriterState.CLOSED
        self.info = ShardInfo(self.path, sha, size, chunks)
        return self.info

    def _finish(self) -> tuple[str, ChunkDigests, int]:
        """Blobs, header, hashes and fsync, then the rename; ``close`` aborts on any failure."""
        position = self._fixed_end
        blob_offsets: dict[str, tuple[int, int]] = {}
        for name in self._blob_names:
            blob = self._blobs.pop(name)
            _pwrite_all(self._fd, memoryview(blob), self._data_start + position)
            blob_offsets[name] = (position, position + len(blob))
            position += len(blob)
        header = self._header_json(blob_offsets)
        header += b" " * (self._header_size - len(header))
        _pwrite_all(self._fd, memoryview(self._header_size.to_bytes(8, "little") + header), 0)
        # Hash the finished bytes (from the page cache) while fsync flushes them: both wait on
        # different things and release the GIL, so the slower one sets close's time. The chunk
        # digests come from the same read, hashed on other threads beside the whole-file sha256.
        hashed: dict[str, tuple[str, ChunkDigests] | BaseException] = {}
        hasher = threading.Thread(
            target=_digests_into, args=(self._tmp, self._chunk_bytes, hashed), daemon=True
        )
        hasher.start()
        try:
            os.fsync(self._fd)
        finally:
            hasher.join()
        os.close(self._fd)
        self._fd = -1
        digests = hashed["digests"]
        if isinstance(digests, BaseException):
            raise digests
        sha, chunks = digests
        size = self._data_start + position
        os.replace(self._tmp, self.path)
        _fsync_dir(self.path.parent)
        return sha, chunks, size

    def abort(self) -> None:
        """Remove the temp file; the final name is never touched. A no-op once closed or aborted."""
        if self._state in (WriterState.CLOSED, WriterState.ABORTED):
            return
        self._state = WriterState.ABORTED
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._tmp.unlink(missing_ok=True)
        self._blobs.clear()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state is WriterState.OPEN:
            try:
                self.close()
            except BaseException:
                self.abort()
                raise


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
