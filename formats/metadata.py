"""Our fields in a shard's safetensors ``__metadata__``: ``quantize_model.*`` keys holding JSON strings.

Beside safetensors' ``"format": "pt"`` (which transformers requires) a shard carries::

    quantize_model.format      {"name": "quantize-model", "version": 1}
    quantize_model.tool        {"name": "quantize-model", "version": "<package version>"}
    quantize_model.tensors     {key: record}  one record per tensor of the shard (quantized or passthrough)
    quantize_model.provenance  {"source", "revision", "files": [{"path", "sha256"}], "options": {...}}

The JSON is written with sorted keys and compact separators, so the same inputs give the same bytes.
``formats/schema/metadata.schema.json`` describes the decoded form; ``validate_metadata`` checks it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from formats.quant_types import QuantType
from formats.validate import FORMAT_NAME, FORMAT_VERSION, BadMetadata, FormatError

SCHEMA_PATH = Path(__file__).with_name("schema") / "metadata.schema.json"
#: Our metadata must stay far below safetensors' 100 MB header limit.
MAX_METADATA_BYTES = 16 * 1024 * 1024
KEYS = ("quantize_model.format", "quantize_model.tool", "quantize_model.tensors", "quantize_model.provenance")


def tool_version() -> str:
    # imported here: importlib.metadata (email, zipfile, csv...) is most of formats.index's import time,
    # which every reader of a folder (inspect, verify, the loader) pays, and only a writer asks this
    from importlib import metadata as importlib_metadata

    try:
        return importlib_metadata.version("quantize-model")
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"


def quantized_record(
    *,
    shape: Sequence[int],
    dtype: str,
    quant_type: QuantType,
    blocksize: int,
    nested: bool,
    quant_storage: str = "uint8",
    transposed: bool = False,
) -> dict[str, Any]:
    """The per-tensor record of a quantized weight (``transposed``: a GPT-2 Conv1D stored as [out, in])."""
    rec: dict[str, Any] = {
        "kind": "quantized",
        "quant_type": quant_type.label,
        "blocksize": int(blocksize),
        "shape": [int(d) for d in shape],
        "dtype": dtype,
        "nested": bool(nested),
        "quant_storage": quant_storage,
    }
    if transposed:
        rec["transposed"] = True
    return rec


def int8_record(*, shape: Sequence[int], dtype: str, scale: str, transposed: bool = False) -> dict[str, Any]:
    """The per-tensor record of an LLM.int8 weight (``scale``: "cpu" or "cuda", the row scale used)."""
    rec: dict[str, Any] = {
        "kind": "quantized",
        "quant_type": "int8",
        "shape": [int(d) for d in shape],
        "dtype": dtype,
        "scale": scale,
    }
    if transposed:
        rec["transposed"] = True
    return rec


def passthrough_record(*, dtype: str, shape: Sequence[int], reason: str) -> dict[str, Any]:
    """The per-tensor record of a tensor kept as it was; ``dtype`` is its safetensors code ("BF16")."""
    return {"kind": "passthrough", "dtype": dtype, "shape": [int(d) for d in shape], "reason": reason}


def provenance(
    *,
    source: str,
    files: Sequence[tuple[str, str | None]],
    options: Mapping[str, Any],
    revision: str | None = None,
) -> dict[str, Any]:
    """Where a shard came from: ``files`` are (source file path, sha256 or None when unknown)."""
    return {
        "source": source,
        "revision": revision,
        "files": [{"path": p, "sha256": h} for p, h in files],
        "options": dict(options),
    }


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def build_metadata(
    tensors: Mapping[str, Mapping[str, Any]],
    prov: Mapping[str, Any],
    *,
    version: str | None = None,
    format_version: int = FORMAT_VERSION,
) -> dict[str, str]:
    """The ``quantize_model.*`` fields for a ShardWriter (which adds ``"format": "pt"``)."""
    out = {
        "quantize_model.format": _dumps({"name": FORMAT_NAME, "version": format_version}),
        "quantize_model.tool": _dumps({"name": FORMAT_NAME, "version": version or tool_version()}),
        "quantize_model.tensors": _dumps(tensors),
        "quantize_model.provenance": _dumps(prov),
    }
    size = sum(len(k) + len(v.encode("utf-8")) for k, v in out.items())
    if size > MAX_METADATA_BYTES:
        msg = f"shard metadata is {size} bytes (limit {MAX_METADATA_BYTES}); use a smaller --max-shard-size"
        raise FormatError(msg)
    return out


def parse_metadata(raw: Mapping[str, str], *, file: str = "<metadata>") -> dict[str, Any] | None:
    """Decode the ``quantize_model.*`` fields (None for a shard without them, e.g. one bnb wrote)."""
    if not any(k.startswith("quantize_model.") for k in raw):
        return None
    decoded: dict[str, Any] = {}
    for key, value in raw.items():
        if key.startswith("quantize_model."):
            try:
                decoded[key] = json.loads(value)
            except ValueError as exc:
                msg = f"{file}: __metadata__ {key!r} is not JSON ({exc})"
                raise BadMetadata(msg) from None
        else:
            decoded[key] = value
    return decoded


@cache
def _validator() -> Any:
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - jsonschema is a test dependency
        msg = "validate_metadata needs the 'jsonschema' package: pip install jsonschema"
        raise ImportError(msg) from None
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def validate_metadata(raw: Mapping[str, str], *, file: str = "<metadata>") -> dict[str, Any]:
    """Check a shard's raw ``__metadata__`` (str -> str) against the schema; returns the decoded form."""
    decoded = parse_metadata(raw, file=file)
    if decoded is None:
        msg = f"{file}: no quantize_model.* fields in __metadata__ (not written by quantize-model)"
        raise BadMetadata(msg)
    errors = sorted(_validator().iter_errors(decoded), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "<root>"
        msg = f"{file}: __metadata__ does not match the schema at {where}: {first.message}"
        raise BadMetadata(msg)
    return decoded
