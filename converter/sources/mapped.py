"""Reading one safetensors file: its validated header, and its tensors memory-mapped one at a time.

Shared by every source (LocalSource, and HubSource for whole downloaded files). numpy only: the CPU
conversion path reads tensors as numpy memory maps and never imports torch; ``get`` wraps a map in a
torch tensor for callers that want one (torch is imported then).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from converter.errors import CorruptFileError


def read_header(path: Path, display: str) -> tuple[bytes, dict]:
    """The raw header bytes (length prefix included) and parsed JSON of a safetensors file.

    safetensors' own ``safe_open`` validates the file first (truncation, overlapping offsets...),
    so every corrupt file gets its message; the raw bytes give data offsets and a content hash.
    """
    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except (SafetensorError, OSError) as exc:
        reason = str(exc).replace("Error while deserializing header: ", "")
        msg = f"{display}: not a valid safetensors file ({reason}); re-download or re-save it"
        raise CorruptFileError(msg) from None
    with path.open("rb") as f:
        prefix = f.read(8)
        (n,) = struct.unpack("<Q", prefix)
        raw = f.read(n)
    return prefix + raw, json.loads(raw)


#: safetensors dtype code -> numpy dtype holding its bits (bf16 as uint16: numpy has no bfloat16).
NP_DTYPES: dict[str, Any] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "F8_E4M3": np.uint8,  # block-scaled FP8 sources (converter/sources/fp8.py): bits viewed as float8_e4m3fn
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def as_torch(arr: np.ndarray, dtype: str) -> Any:
    """A numpy array holding ``dtype`` values as a torch tensor sharing its memory (imports torch)."""
    import torch

    t = torch.from_numpy(arr)
    if dtype == "F8_E4M3":
        return t.view(torch.float8_e4m3fn)
    return t.view(torch.bfloat16) if dtype == "BF16" else t


class MappedFile:
    """Tensors of one safetensors file, memory-mapped one at a time (file-backed pages, no copy).

    Each tensor is its own copy-on-write map (writable, so torch.from_numpy accepts it without a
    warning; nothing is ever written back). Its pages count as file-backed memory, not anonymous,
    and are unmapped when the array is dropped: a whole-file map would keep every page read so far
    in the process's RSS until the file is done.
    """

    def __init__(self, path: Path, display: str | None = None) -> None:
        self._fd = -1  # first: __del__ runs even when the header read below raises (or is interrupted)
        self.path = Path(path)
        raw, header = read_header(self.path, display or str(path))
        self._start = len(raw)
        self._entries = {k: v for k, v in header.items() if k != "__metadata__"}
        self._fd = os.open(self.path, os.O_RDONLY)  # one descriptor for every map and readahead

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading ``name``'s bytes now (async readahead into the page cache).

        The pipeline calls it for the next tensor while the current one is quantized, so a cold
        source is read while the CPU works instead of page fault by page fault afterwards.
        """
        entry = self._entries.get(name)
        if entry is None or not hasattr(os, "posix_fadvise"):
            return
        begin, end = entry["data_offsets"]
        if end > begin:
            os.posix_fadvise(self._fd, self._start + begin, end - begin, os.POSIX_FADV_WILLNEED)

    def get_array(self, name: str) -> tuple[np.ndarray, str]:
        """``name`` as a memory-mapped numpy array and its safetensors dtype code (bf16: uint16 bits)."""
        entry = self._entries[name]
        dtype, shape = entry["dtype"], tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        self.prefetch(name)
        np_dtype = numpy_dtype(dtype, f"tensor {name!r} in {self.path}")
        return self._map(self._start + begin, end - begin, np_dtype, shape), dtype

    def _map(self, offset: int, length: int, np_dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        """``length`` bytes at ``offset`` of the file as a numpy array of ``shape`` over a private memory map
        of those bytes only (an empty array for none)."""
        if length <= 0:
            return np.empty(shape, dtype=np_dtype)
        aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
        region = mmap.mmap(self._fd, offset + length - aligned, offset=aligned, access=mmap.ACCESS_COPY)
        count = length // np.dtype(np_dtype).itemsize
        return np.frombuffer(region, dtype=np_dtype, count=count, offset=offset - aligned).reshape(shape)

    def get(self, name: str) -> Any:
        """``name`` as a torch tensor over the same memory map."""
        return as_torch(*self.get_array(name))

    def _row_range(self, name: str, start: int, stop: int) -> tuple[dict, int, int]:
        """(header entry, first byte, byte count) of rows ``start:stop`` along ``name``'s first dimension."""
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        skip, length = row_span(end - begin, entry["shape"], start, stop)
        return entry, self._start + begin + skip, length

    def prefetch_rows(self, name: str, start: int, stop: int) -> None:
        """:meth:`prefetch` for rows ``start:stop`` (first dimension) of ``name`` only."""
        if name not in self._entries or not hasattr(os, "posix_fadvise"):
            return
        _, offset, length = self._row_range(name, start, stop)
        if length > 0:
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def get_rows(self, name: str, start: int, stop: int) -> Any:
        """Rows ``start:stop`` along the first dimension of ``name`` as a torch tensor over a memory map of
        those bytes only (a Llama 4 expert of a fused 3-D experts tensor, converter/sources/llama4.py)."""
        entry, offset, length = self._row_range(name, start, stop)
        dtype, shape = entry["dtype"], (stop - start, *entry["shape"][1:])
        np_dtype = numpy_dtype(dtype, f"tensor {name!r} in {self.path}")
        if length > 0:
            self.prefetch_rows(name, start, stop)
        return as_torch(self._map(offset, length, np_dtype, shape), dtype)


def numpy_dtype(dtype: str, where: str) -> Any:
    """The numpy dtype holding safetensors dtype ``dtype``'s bits, or a CorruptFileError naming ``where``."""
    np_dtype = NP_DTYPES.get(dtype)
    if np_dtype is None:
        msg = f"{where}: dtype {dtype} is not supported; re-save it as F32/F16/BF16"
        raise CorruptFileError(msg)
    return np_dtype


def row_span(nbytes: int, shape: Any, start: int, stop: int) -> tuple[int, int]:
    """(first byte, byte count) of rows ``start:stop`` along the first dimension of a tensor of ``shape``
    and ``nbytes`` (a Llama 4 expert's block of a fused experts tensor: converter/sources/llama4.py)."""
    row = nbytes // shape[0] if shape and shape[0] else 0
    return start * row, (stop - start) * row
