"""Shard reader: validate the whole header up front, then hand out memory-mapped tensors.

Reads our shards and bnb/transformers-made ones alike (those carry no ``quantize_model.*`` metadata).
Tensors are zero-copy views of a copy-on-write memory map: nothing is read from disk before use, and
writing to a returned tensor never reaches the file.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from formats import writer as _writer
from formats.gc_pause import gc_paused
from formats.index import INDEX_NAME, read_index
from formats.metadata import parse_metadata
from formats.validate import (
    BadIndex,
    DuplicateTensor,
    Int8Info,
    MissingQuantComponent,
    QuantGroup,
    TensorEntry,
    ValidatedShard,
    find_quant_groups,
    validate_file,
)

if TYPE_CHECKING:
    # numpy and torch are imported by the methods that return tensors: inspect/verify never do
    import numpy as np
    import torch

    from formats.int8 import Int8Tensor
    from formats.record import QuantizedTensor


def record_from_group(
    group: QuantGroup, tensors: Mapping[str, torch.Tensor], file: str, dtype: str | None
) -> QuantizedTensor | Int8Tensor:
    """The record of one validated group of keys: 4-bit (quant-state JSON) or LLM.int8 (SCB).

    ``dtype`` is the original dtype from our metadata record (int8 keys do not carry it), or None.
    """
    if isinstance(group.info, Int8Info):
        from formats.int8 import Int8Tensor  # torch: imported only when a record is built

        return Int8Tensor.from_state_dict(group.name, tensors, file=file, dtype=dtype)
    from formats.record import QuantizedTensor

    # The group's quant state was parsed and its keys checked when the shard was validated.
    return QuantizedTensor.from_checked_group(group.name, group.info, group.quant_storage, tensors)


def _map_copy_on_write(path: Path) -> mmap.mmap:
    """The whole file mapped copy-on-write: writes to it never reach the file."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


class Shard:
    """One validated shard. Use ``open_shard(path)``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f, gc_paused():
            size = os.fstat(f.fileno()).st_size
            self._shard: ValidatedShard = validate_file(self.path, f, size)
        self.raw_metadata: dict[str, str] = self._shard.metadata
        #: decoded ``quantize_model.*`` fields (plus "format"), None for a shard we did not write
        self.metadata: dict[str, Any] | None = parse_metadata(self.raw_metadata, file=str(self.path))
        # Mapped now (copy-on-write, as np.memmap mode="c"), wrapped as a numpy array on the first tensor:
        # a reader that never asks for tensor data (inspect, verify) does not import numpy (~0.15 s).
        self._map: mmap.mmap | None = _map_copy_on_write(self.path) if size else None
        self._array: np.ndarray | None = None

    @property
    def data_start(self) -> int:
        """File offset of the data buffer (8 + header length)."""
        return self._shard.data_start

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
        return self._tensor(entry, _writer.TORCH_DTYPES[entry.dtype])

    def _tensor(self, entry: Any, dtype: torch.dtype) -> torch.Tensor:
        """The stored bytes of ``entry`` as a tensor of ``dtype`` (a view of the mapped file)."""
        import torch

        if entry.end == entry.begin or self._map is None:
            return torch.empty(entry.shape, dtype=dtype)
        start = self._shard.data_start
        raw = torch.from_numpy(self.mapped_bytes()[start + entry.begin : start + entry.end])
        try:
            return raw.view(dtype).reshape(entry.shape)
        except RuntimeError:  # misaligned for this dtype: copy once
            return raw.clone().view(dtype).reshape(entry.shape)

    def record(self, name: str) -> QuantizedTensor | Int8Tensor:
        """The quantized weight ``name`` (its weight key) as a record."""
        group = self._shard.groups.get(name)
        if group is None:
            msg = f"{self.path}: {name!r} is not a quantized weight in this shard"
            raise KeyError(msg)

        tensors = {k: self.get_tensor(k) for k in group.keys}
        return record_from_group(group, tensors, str(self.path), self.metadata_dtype(name))

    def metadata_dtype(self, name: str) -> str | None:
        """The original dtype our metadata records for tensor ``name`` (None in a shard bnb wrote)."""
        records = (self.metadata or {}).get("quantize_model.tensors") or {}
        dtype = (records.get(name) or {}).get("dtype")
        return dtype if isinstance(dtype, str) else None

    @property
    def partial(self) -> dict[str, tuple[str, ...]]:
        """Quantized weights with only some of their keys in this shard (bnb/transformers sharding
        may split them): weight key -> the keys present here. Always empty for our shards."""
        return dict(self._shard.partial)

    def entry(self, name: str) -> TensorEntry:
        """dtype code, shape and data offsets of a tensor (no data read)."""
        return self._shard.entries[name]

    def group(self, name: str) -> QuantGroup:
        """The validated keys and quant state of quantized weight ``name`` (no data read, no torch):
        ``open_shard`` already checked them against bitsandbytes' layout."""
        group = self._shard.groups.get(name)
        if group is None:
            msg = f"{self.path}: {name!r} is not a quantized weight in this shard"
            raise KeyError(msg)
        return group

    def records(self) -> dict[str, QuantizedTensor | Int8Tensor | torch.Tensor]:
        """Every quantized weight as a record, and every passthrough tensor as a tensor.

        Refuses a shard whose quantized weights are split across shards: read those with
        ``open_folder`` / ``open_checkpoint``, which join the pieces.
        """
        if self._shard.partial:
            name = next(iter(self._shard.partial))
            msg = (
                f"{self.path}: tensor {name!r}: its quant-state keys are split across shards "
                f"({len(self._shard.partial)} weight(s)); open the whole checkpoint with "
                "formats.reader.open_folder"
            )
            raise MissingQuantComponent(msg)
        out: dict[str, QuantizedTensor | Int8Tensor | torch.Tensor] = {
            name: self.record(name) for name in self.quantized
        }
        out.update({name: self.get_tensor(name) for name in self.passthrough})
        return out

    def mapped_bytes(self) -> np.ndarray | None:
        """The whole file's copy-on-write mapping as a uint8 array (None for an empty file), made on the
        first call: the tensors are views of it, and the loader's stream reads it by address."""
        if self._array is None and self._map is not None:
            import numpy as np

            self._array = np.frombuffer(self._map, dtype=np.uint8)
        return self._array

    def close(self) -> None:
        self._map = self._array = None

    def __enter__(self) -> Shard:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_shard(path: str | os.PathLike[str]) -> Shard:
    """Open and validate a safetensors shard. Raises a ``FormatError`` subclass for a bad file."""
    return Shard(Path(path))


class Checkpoint:
    """Several shards read as one: keys are unique across shards, and quantized weights whose keys
    bnb/transformers' sharding split over several shards are joined and validated as a whole."""

    def __init__(
        self,
        paths: Sequence[Path],
        *,
        weight_map: Mapping[str, str] | None = None,
        opener: Callable[[Path], Shard] | None = None,
    ) -> None:
        """``opener(path)``: the validated shard of ``path`` (default: ``open_shard``)."""
        self.shards: list[Shard] = [(opener or open_shard)(p) for p in paths]
        self._where: dict[str, Shard] = {}
        for shard in self.shards:
            for key in shard.keys():
                if key in self._where:
                    msg = f"{shard.path}: tensor {key!r} is also in {self._where[key].path}; inconsistent"
                    raise DuplicateTensor(msg)
                self._where[key] = shard
        if weight_map is not None:
            for key, shard in self._where.items():
                if weight_map.get(key) != shard.path.name:
                    msg = f"{shard.path}: tensor {key!r} is mapped to {weight_map.get(key)!r} by {INDEX_NAME}"
                    raise BadIndex(msg)
            missing = sorted(set(weight_map) - set(self._where))
            if missing:
                msg = f"{INDEX_NAME}: {len(missing)} mapped tensor(s) are in no shard, e.g. {missing[0]!r}"
                raise BadIndex(msg)
        # Join split groups: their pieces plus the weight key, wherever each one is.
        pieces = {k for s in self.shards for ks in s.partial.values() for k in ks}
        pieces |= {b for s in self.shards for b in s.partial if b in self._where}
        entries = {k: (self.entry(k).dtype, self.entry(k).shape) for k in sorted(pieces)}
        label = str(self.shards[0].path.parent) if self.shards else "<checkpoint>"
        self._joined, _ = find_quant_groups(label, entries, self._read, complete=True)
        claimed = {k for g in self._joined.values() for k in g.keys}
        # A joined group's weight key may look like a plain tensor in its own shard (int8: <m>.weight
        # without its <m>.SCB): it belongs to the group.
        self._passthrough = [k for s in self.shards for k in s.passthrough if k not in claimed]
        self._passthrough += [k for k in entries if k not in claimed and k not in self._passthrough]
        self._quantized = [n for s in self.shards for n in s.quantized] + list(self._joined)

    def _read(self, key: str) -> bytes:
        import torch

        return self.get_tensor(key).reshape(-1).view(torch.uint8).numpy().tobytes()

    def keys(self) -> list[str]:
        return list(self._where)

    def entry(self, name: str) -> TensorEntry:
        return self._where[name].entry(name)

    def get_tensor(self, name: str) -> torch.Tensor:
        shard = self._where.get(name)
        if shard is None:
            msg = f"no tensor {name!r} in this checkpoint"
            raise KeyError(msg)
        return shard.get_tensor(name)

    @property
    def quantized(self) -> list[str]:
        return list(self._quantized)

    @property
    def passthrough(self) -> list[str]:
        return list(self._passthrough)

    def record(self, name: str) -> QuantizedTensor | Int8Tensor:
        if name in self._joined:
            tensors = {k: self.get_tensor(k) for k in self._joined[name].keys}
            return record_from_group(self._joined[name], tensors, str(self._where[name].path), None)
        if name not in self._where:
            msg = f"no quantized weight {name!r} in this checkpoint"
            raise KeyError(msg)
        return self._where[name].record(name)

    def records(self) -> dict[str, QuantizedTensor | Int8Tensor | torch.Tensor]:
        """Every quantized weight as a record and every other tensor as a tensor, over all shards."""
        with gc_paused():
            out: dict[str, QuantizedTensor | Int8Tensor | torch.Tensor] = {
                n: self.record(n) for n in self._quantized
            }
            out.update({n: self.get_tensor(n) for n in self._passthrough})
        return out

    def close(self) -> None:
        for shard in self.shards:
            shard.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_checkpoint(paths: Sequence[str | os.PathLike[str]]) -> Checkpoint:
    """Open the given shard files as one checkpoint."""
    return Checkpoint([Path(p) for p in paths])


def open_folder(folder: str | os.PathLike[str]) -> Checkpoint:
    """A checkpoint folder: the shards ``model.safetensors.index.json`` names (checked against its
    weight_map), else its single ``*.safetensors`` file."""
    folder = Path(folder)
    if (folder / INDEX_NAME).is_file():
        index = read_index(folder)
        return Checkpoint([folder / n for n in index.files], weight_map=index.weight_map)
    found = sorted(folder.glob("*.safetensors"))
    if len(found) != 1:
        msg = f"{folder}: no {INDEX_NAME} and {len(found)} *.safetensors files; expected exactly one"
        raise BadIndex(msg)
    return Checkpoint(found)
