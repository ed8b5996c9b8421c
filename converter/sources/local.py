"""A checkpoint on local disk: a folder (single or sharded safetensors) or one .safetensors file.

Everything is validated up front from the headers, before any tensor data is read: missing shards,
corrupt or truncated files, index entries that are not in their shard, already-quantized and
pickle-only checkpoints each raise a one-line converter.errors exception naming the file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from converter.errors import AlreadyQuantizedError, CorruptFileError, PickleOnlyError, SourceNotFoundError
from converter.sources.base import Source, TensorInfo, is_extra_file, quantized_reason

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def read_header(path: Path, display: str) -> tuple[bytes, dict]:
    """The raw header bytes (length prefix included) and parsed JSON of a safetensors file.

    safetensors' own ``safe_open`` validates the file first (truncation, overlapping offsets...),
    so every corrupt file gets its message; the raw bytes give data offsets and a content hash.
    """
    try:
        with safe_open(str(path), framework="pt"):
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


def _load_json(path: Path, display: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = f"{display}: not valid JSON ({exc}); fix or re-download it"
        raise CorruptFileError(msg) from None
    if not isinstance(data, dict):
        msg = f"{display}: expected a JSON object; fix or re-download it"
        raise CorruptFileError(msg)
    return data


class LocalSource(Source):
    def __init__(self, path: Path, *, allow_pickle: bool = False) -> None:
        path = Path(path).expanduser().resolve()
        self._weight_map: dict[str, str] | None = None
        if not path.exists():
            msg = f"{path}: no such file or folder; check the path"
            raise SourceNotFoundError(msg)
        if path.is_file():
            if path.suffix != ".safetensors":
                self._refuse_non_safetensors(path, [path.name])
            self.root = path.parent
            files = [path.name]
        else:
            self.root = path
            files = self._find_weight_files()
        self._files = files
        self._config = self._read_config()
        self._headers: dict[str, str] = {}
        self._tensors = self._read_tensors()
        del allow_pickle  # pickle conversion is offered for Hub sources only (sources/hub.py)
        reason = quantized_reason(self._config, self._tensors)
        if reason:
            msg = f"{self.root}: already quantized ({reason}); convert the original checkpoint instead"
            raise AlreadyQuantizedError(msg)

    # --- discovery -------------------------------------------------------------------------
    def _find_weight_files(self) -> list[str]:
        index = self.root / INDEX_NAME
        if index.exists():
            data = _load_json(index, str(index))
            weight_map = data.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                msg = f"{index}: has no weight_map; fix or re-download it"
                raise CorruptFileError(msg)
            self._weight_map = {str(k): str(v) for k, v in weight_map.items()}
            files = sorted(set(self._weight_map.values()))
            for name in files:
                if not (self.root / name).is_file():
                    msg = f"{self.root / name}: missing (named by {INDEX_NAME}); download the missing shard"
                    raise SourceNotFoundError(msg)
            return files
        if (self.root / SINGLE_NAME).is_file():
            return [SINGLE_NAME]
        found = sorted(p.name for p in self.root.glob("*.safetensors"))
        if len(found) == 1:
            return found
        if len(found) > 1:
            msg = (
                f"{self.root}: {len(found)} .safetensors files but no {INDEX_NAME}; "
                "pass one file as SOURCE or add the index"
            )
            raise SourceNotFoundError(msg)
        pickles = sorted(p.name for p in self.root.iterdir() if p.suffix in PICKLE_SUFFIXES)
        self._refuse_non_safetensors(self.root, pickles)
        raise AssertionError  # unreachable: _refuse_non_safetensors always raises

    @staticmethod
    def _refuse_non_safetensors(where: Path, names: list[str]) -> None:
        if any(n.endswith(PICKLE_SUFFIXES) for n in names):
            msg = (
                f"{where}: only pickle weights ({', '.join(names[:3])}); quantize-model reads safetensors: "
                "re-save the model with save_pretrained(..., safe_serialization=True)"
            )
            raise PickleOnlyError(msg)
        msg = f"{where}: no model.safetensors, {INDEX_NAME} or .safetensors file; check the path"
        raise SourceNotFoundError(msg)

    def _read_config(self) -> dict | None:
        path = self.root / "config.json"
        return _load_json(path, str(path)) if path.is_file() else None

    def _read_tensors(self) -> list[TensorInfo]:
        tensors: list[TensorInfo] = []
        seen: dict[str, str] = {}
        for file in self._files:
            path = self.root / file
            raw, header = read_header(path, str(path))
            self._headers[file] = hashlib.sha256(raw).hexdigest()
            entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
            # On-disk order: the pipeline then reads each file front to back.
            entries.sort(key=lambda kv: (kv[1]["data_offsets"][0], kv[0]))
            for name, entry in entries:
                if name in seen:
                    msg = f"{path}: tensor {name!r} is also in {seen[name]}; remove the duplicate"
                    raise CorruptFileError(msg)
                seen[name] = file
                tensors.append(TensorInfo(name, file, entry["dtype"], tuple(int(d) for d in entry["shape"])))
        if self._weight_map is not None:
            for name, file in self._weight_map.items():
                if seen.get(name) != file:
                    where = f"found in {seen[name]}" if name in seen else "in no shard"
                    msg = (
                        f"{self.root / INDEX_NAME}: tensor {name!r} is mapped to {file} but {where}; "
                        "re-download the checkpoint"
                    )
                    raise CorruptFileError(msg)
        return tensors

    # --- Source ----------------------------------------------------------------------------
    def describe(self) -> dict:
        files = {}
        for name in self._files:
            st = (self.root / name).stat()
            files[name] = {
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "header_sha256": self._headers[name],
            }
        return {"kind": "local", "path": str(self.root), "name": self.root.name, "files": files}

    def config(self) -> dict | None:
        return self._config

    def tensors(self) -> list[TensorInfo]:
        return list(self._tensors)

    def weight_files(self) -> list[str]:
        return list(self._files)

    def acquire(self, file: str) -> Path:
        return self.root / file

    def release(self, file: str) -> None:
        """Nothing to free: local files are only memory-mapped."""

    def extra_files(self) -> list[str]:
        # Top level, plus one level down for sentence-transformers module folders (1_Pooling/).
        candidates = [*self.root.glob("*"), *self.root.glob("*/*")]
        rels = sorted(p.relative_to(self.root).as_posix() for p in candidates if p.is_file())
        return [r for r in rels if not r.startswith(".") and is_extra_file(r)]

    def copy_extra_file(self, name: str, dest: Path) -> None:
        shutil.copyfile(self.root / name, dest)

    def close(self) -> None:
        """Nothing held open between calls."""


_NP_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # numpy has no bfloat16: map the bits, then view them as torch.bfloat16
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


class MappedFile:
    """Tensors of one safetensors file, memory-mapped one at a time (file-backed pages, no copy).

    Each tensor is an ``np.memmap`` in copy-on-write mode (writable, so torch.from_numpy accepts it
    without a warning; nothing is ever written back). Its pages count as file-backed memory, not
    anonymous, and go away when the tensor is dropped.
    """

    def __init__(self, path: Path, display: str | None = None) -> None:
        self.path = Path(path)
        raw, header = read_header(self.path, display or str(path))
        self._start = len(raw)
        self._entries = {k: v for k, v in header.items() if k != "__metadata__"}

    def get(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        dtype, shape = entry["dtype"], tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        np_dtype = _NP_DTYPES.get(dtype)
        if np_dtype is None:
            msg = (
                f"tensor {name!r} in {self.path}: dtype {dtype} is not supported; re-save it as F32/F16/BF16"
            )
            raise CorruptFileError(msg)
        if end == begin:
            arr = np.empty(shape, dtype=np_dtype)
        else:
            mapped = np.memmap(
                self.path, dtype=np_dtype, mode="c", offset=self._start + begin, shape=shape or (1,)
            )
            arr = mapped.reshape(shape)
        t = torch.from_numpy(arr)
        return t.view(torch.bfloat16) if dtype == "BF16" else t
