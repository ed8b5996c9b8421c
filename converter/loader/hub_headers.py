"""A Hub repo's state from its shard headers alone, read by HTTP range requests (``estimate``).

Every shard is validated as a local one is (``formats.validate.validate_file``) through a file object
whose reads are range requests: the header, then the small tensors whose values matter before any
weight is used (4-bit quant-state JSON and code tables, int8 ``weight_format``): those at most
``MERGE_GAP`` (64 KiB) apart in one request, up to ``WORKERS`` (8) requests in flight at once. Those
tensors are real; every other one is a meta tensor of its shape and dtype, enough to build and size
the model skeleton. No shard is downloaded, nothing goes into the cache.
"""

from __future__ import annotations

import bisect
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

from converter.errors import CorruptFileError, SourceNotFoundError
from converter.loader.state import NotQuantizedError
from converter.sources.hub_ranges import RangeReader
from formats.index import INDEX_NAME, SINGLE_NAME, read_index
from formats.metadata import parse_metadata
from formats.reader import Checkpoint, Shard
from formats.validate import FormatError, validate_file

__all__ = ["header_state"]

#: the tensors read up front: their values are checked (validation, MoE stacking); all are small
_VALUE_SUFFIXES = (".quant_map", ".nested_quant_map", ".weight_format")
_VALUE_INFIX = ".quant_state."


class _RangeFile:
    """The read-only file object ``validate_file`` reads one Hub shard through: the length prefix and
    header, then the value tensors (``_VALUE_SUFFIXES``, quant states), come by range requests up front
    (``RangeReader.get_spans``: merged across small gaps, concurrent);
    a read of anything else is one more range request."""

    def __init__(self, hub: RangeReader, file: str) -> None:
        self.hub, self.file, self.pos = hub, file, 0
        prefix = hub.get(file, 0, 8)
        (n,) = struct.unpack("<Q", prefix)
        self.head = prefix + hub.get(file, 8, n)
        self.size = len(self.head)  # a header validate_file refuses: it names what is wrong
        spans: list[tuple[int, int]] = []
        try:
            entries = json.loads(self.head[8:])
            tensors = {k: e["data_offsets"] for k, e in entries.items() if k != "__metadata__"}
            self.size += max((end for _, end in tensors.values()), default=0)
            spans = sorted(
                (len(self.head) + a, len(self.head) + b)
                for k, (a, b) in tensors.items()
                if k.endswith(_VALUE_SUFFIXES) or _VALUE_INFIX in k
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            pass
        # merged across small gaps, the requests concurrent (RangeReader.get_spans): a repo of
        # per-expert records has one span (or two) per quantized weight, thousands per shard
        self._values = {(a, b) for a, b in spans if 0 <= a < b <= self.size}
        blocks = hub.get_spans(file, self._values)
        self._starts = [a for a, _ in blocks]
        self._blocks = [data for _, data in blocks]

    def cached(self, start: int, n: int) -> bytes | None:
        """The ``n`` bytes at ``start`` if a range read fetched them, else None."""
        i = bisect.bisect_right(self._starts, start) - 1
        if i < 0 or start + n > self._starts[i] + len(self._blocks[i]):
            return None
        off = start - self._starts[i]
        return self._blocks[i][off : off + n]

    def value(self, start: int, n: int) -> bytes | None:
        """The ``n`` bytes at ``start`` if they are one of the value tensors read up front, else None
        (a tensor whose bytes came along in a merged request stays a meta tensor)."""
        return self.cached(start, n) if (start, start + n) in self._values else None

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        self.pos = pos if whence == os.SEEK_SET else self.pos + pos
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n < 0 else min(n, self.size - self.pos)
        if self.pos + n <= len(self.head):
            data = self.head[self.pos : self.pos + n]
        else:
            data = self.cached(self.pos, n)
            if data is None:
                data = self.hub.get(self.file, self.pos, n)
        self.pos += len(data)
        return data


class _HeaderShard(Shard):
    """A shard validated from its header (``_RangeFile``): the tensors its file read are real, every
    other one a meta tensor."""

    def __init__(self, path: Path, f: _RangeFile) -> None:
        self.path = path
        self._shard = validate_file(path, f, f.size)  # type: ignore[arg-type]  # seek/read is all it uses
        self.raw_metadata = self._shard.metadata
        self.metadata = parse_metadata(self.raw_metadata, file=str(path))
        self._map = self._array = None  # no mapping: Shard.mapped_bytes() is None
        self._file = f

    def _tensor(self, entry: Any, dtype: torch.dtype) -> torch.Tensor:
        data = self._file.value(self._shard.data_start + entry.begin, entry.end - entry.begin)
        if data is None or entry.end == entry.begin:
            return torch.empty(entry.shape, dtype=dtype, device="meta")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(entry.shape)


def header_state(repo_id: str, folder: Path, subfolder: str, token: str | bool | None) -> dict[str, Any]:
    """``load_quantized_state``'s result for the Hub repo ``repo_id`` with meta tensors (see the module
    docstring). ``folder``: its snapshot of JSON files (``resolve_folder(..., weights=False)``), whose
    commit the shards are read at; ``subfolder``: the checkpoint's folder in the repo."""
    sub = subfolder.strip("/")
    snapshot = folder.parents[len(Path(sub).parts) - 1] if sub else folder
    hub = RangeReader(repo_id, snapshot.name, token)  # the snapshot's commit
    prefix = f"{sub}/" if sub else ""
    weight_map = None
    if (folder / INDEX_NAME).is_file():
        try:
            weight_map = read_index(folder, require_files=False).weight_map
        except FormatError as exc:
            raise CorruptFileError(str(exc)) from exc
        names = list(dict.fromkeys(weight_map.values()))
    else:
        found = [f[len(prefix) :] for f in hub.files if f.startswith(prefix) and f.endswith(".safetensors")]
        found = [f for f in found if "/" not in f]
        names = [SINGLE_NAME] if SINGLE_NAME in found else found
        if len(names) != 1:
            msg = f"{repo_id}: no {INDEX_NAME} and {len(names)} *.safetensors files at {hub.commit}"
            raise SourceNotFoundError(msg)
    try:
        checkpoint = Checkpoint(
            [Path(n) for n in names],
            weight_map=weight_map,
            opener=lambda p: _HeaderShard(p, _RangeFile(hub, prefix + p.name)),
        )
        out = checkpoint.records()
    except FormatError as exc:
        msg = f"{repo_id}: {exc}"
        raise CorruptFileError(msg) from exc
    if all(isinstance(v, torch.Tensor) for v in out.values()):
        msg = (
            f"{repo_id}: no quantized weight (no '*.quant_state.bitsandbytes__nf4|fp4' key and no int8 "
            "'*.SCB' key); not a bitsandbytes 4-bit or 8-bit checkpoint"
        )
        raise NotQuantizedError(msg)
    return out
