"""Shard reader: validate the whole header up front, then hand out memory-mapped tensors.

Reads our shards and bnb/transformers-made ones alike (those carry no ``quantize_model.*`` metadata).
Tensors are zero-copy views of a copy-on-write memory map: nothing is read from disk before use, and
writing to a returned tensor never reaches the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

from formats.metadata import parse_metadata
from formats.record import QuantizedTensor
from formats.validate import ValidatedShard, validate_file
from formats.writer import TORCH_DTYPES


class Shard:
    """One validated shard. Use ``open_shard(path)``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self._shard: ValidatedShard = validate_file(self.path, f, size)
        self.raw_metadata: dict[str, str] = self._shard.metadata
        #: decoded ``quantize_model.*`` fields (plus "format"), None for a shard we did not write
        self.metadata: dict[str, Any] | None = parse_metadata(self.raw_metadata, file=str(self.path))
        self._map: np.memmap | None = np.memmap(self.path, dtype=np.uint8, mode="c") if size else None

    @property
    def data_size(self) -> int:
        """Bytes of tensor data (the file minus the length prefix and the header)."""
        return max((e.end for e in self._shard.entries.values()), default=0)

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._shard.entries)

    def __contains__(self, name: str) -> bool:
        return name in self._shard.entries

    @property
    def quantized(self) -> list[str]:
        """Weight keys of the quantized weights."""
        return list(self._shard.groups)

    @property
    def passthrough(self) -> list[str]:
        """Keys of tensors that are not part of a quantized weight's group."""
        return list(self._shard.passthrough)

    def get_tensor(self, name: str) -> torch.Tensor:
        """The tensor as stored (a quantized weight's packed codes for ``W``), zero-copy."""
        entry = self._shard.entries.get(name)
        if entry is None:
            msg = f"{self.path}: no tensor {name!r} in this shard"
            raise KeyError(msg)
        dtype = TORCH_DTYPES[entry.dtype]
        if entry.end == entry.begin or self._map is None:
            return torch.empty(entry.shape, dtype=dtype)
        start = self._shard.data_start
        raw = torch.from_numpy(self._map[start + entry.begin : start + entry.end])
        try:
            return raw.view(dtype).reshape(entry.shape)
        except RuntimeError:  # misaligned for this dtype: copy once
            return raw.clone().view(dtype).reshape(entry.shape)

    def record(self, name: str) -> QuantizedTensor:
        """The quantized weight ``name`` (its weight key) as a record."""
        group = self._shard.groups.get(name)
        if group is None:
            msg = f"{self.path}: {name!r} is not a quantized weight in this shard"
            raise KeyError(msg)
        tensors = {k: self.get_tensor(k) for k in group.keys}
        return QuantizedTensor.from_state_dict(name, tensors, file=str(self.path))

    def records(self) -> dict[str, QuantizedTensor | torch.Tensor]:
        """Every quantized weight as a record, and every passthrough tensor as a tensor."""
        out: dict[str, QuantizedTensor | torch.Tensor] = {
            name: self.record(name) for name in self._shard.groups
        }
        out.update({name: self.get_tensor(name) for name in self._shard.passthrough})
        return out

    def close(self) -> None:
        self._map = None

    def __enter__(self) -> Shard:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_shard(path: str | os.PathLike[str]) -> Shard:
    """Open and validate a safetensors shard. Raises a ``FormatError`` subclass for a bad file."""
    return Shard(Path(path))
