"""Our __metadata__ fields: deterministic JSON strings that match the schema."""

from __future__ import annotations

import json

import pytest

from formats.metadata import (
    build_metadata,
    parse_metadata,
    passthrough_record,
    provenance,
    quantized_record,
    validate_metadata,
)
from formats.quant_types import QuantType
from formats.validate import BadMetadata

OPTIONS = {"quant_type": "nf4", "blocksize": 64, "double_quant": True, "quant_storage": "uint8"}


def _meta() -> dict[str, str]:
    tensors = {
        "a.weight": quantized_record(
            shape=(4, 64), dtype="bfloat16", quant_type=QuantType.NF4, blocksize=64, nested=True
        ),
        "lm_head.weight": passthrough_record(dtype="BF16", shape=(10, 4), reason="skip: lm_head"),
    }
    prov = provenance(source="org/model@abc", files=[("model.safetensors", None)], options=OPTIONS)
    return build_metadata(tensors, prov, version="0.1.0")


def test_valid_metadata_passes_and_is_deterministic() -> None:
    meta = _meta()
    assert meta == _meta()
    assert json.loads(meta["quantize_model.format"]) == {"name": "quantize-model", "version": 1}
    decoded = validate_metadata({"format": "pt", **meta})
    assert decoded["quantize_model.tensors"]["a.weight"]["nested"] is True


@pytest.mark.parametrize(
    ("key", "change", "where"),
    [
        ("quantize_model.format", {"name": "quantize-model", "version": 3}, "quantize_model.format/version"),
        ("quantize_model.tool", {"name": "quantize-model"}, "quantize_model.tool"),
        ("quantize_model.tensors", {"w": {"kind": "quantized"}}, "quantize_model.tensors/w"),
        (
            "quantize_model.provenance",
            {"source": "x", "files": [], "options": {**OPTIONS, "colour": "red"}},
            "quantize_model.provenance/options",
        ),
    ],
)
def test_schema_rejects(key: str, change: object, where: str) -> None:
    meta = {"format": "pt", **_meta(), key: json.dumps(change)}
    with pytest.raises(BadMetadata, match=f"at {where}"):
        validate_metadata(meta, file="s.safetensors")


def test_non_json_field_and_missing_fields() -> None:
    with pytest.raises(BadMetadata, match=r"'quantize_model\.tool' is not JSON"):
        parse_metadata({"format": "pt", "quantize_model.tool": "{"})
    assert parse_metadata({"format": "pt"}) is None
    with pytest.raises(BadMetadata, match="no quantize_model"):
        validate_metadata({"format": "pt"})
    with pytest.raises(BadMetadata, match="at format: 'pt' was expected"):
        validate_metadata({**_meta(), "format": "np"})
