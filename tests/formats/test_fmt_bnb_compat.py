"""Our bnb keys and JSON bytes against bitsandbytes itself; our quantization_config against transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fmt_helpers import DTYPES, as_bits, bnb_state_dict, randn, reference_record

from formats import bnb_compat
from formats.quant_types import QuantType
from formats.record import QuantizedTensor
from formats.validate import BadQuantState

bnb = pytest.importorskip("bitsandbytes")
NAME = "model.layers.0.mlp.down_proj.weight"


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_json_bytes_and_round_trip_equal_bnb(quant_type: str, nested: bool, dtype: str) -> None:
    x = randn((48, 128), DTYPES[dtype], seed=3)
    sd = bnb_state_dict(NAME, x, quant_type, nested)
    qs_key = f"{NAME}.quant_state.bitsandbytes__{quant_type}"
    info = bnb_compat.parse_quant_state("bnb", qs_key, sd[qs_key].numpy().tobytes())
    ours = bnb_compat.quant_state_json(QuantType.parse(quant_type), 64, dtype, (48, 128), info.nested_offset)
    assert ours == sd[qs_key].numpy().tobytes()
    # bnb-made keys -> record -> keys: identical names, order, dtypes, shapes and bytes.
    rec = QuantizedTensor.from_state_dict(NAME, sd)
    back = rec.state_dict()
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype, k
        assert back[k].shape == v.shape, k
        assert np.array_equal(as_bits(back[k]), as_bits(v)), k


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_reference_record_equals_bnb_state_dict_nf4(dtype: str) -> None:
    """Non-nested NF4: our record from formats.reference is bnb's state dict, byte for byte."""
    x = randn((32, 192), DTYPES[dtype], seed=5)
    sd = bnb_state_dict(NAME, x, "nf4", nested=False)
    ours = reference_record(NAME, x, QuantType.NF4, 64, nested=False).state_dict()
    assert list(ours) == list(sd)
    for k in sd:
        assert (ours[k].dtype, ours[k].shape) == (sd[k].dtype, sd[k].shape), k
        assert np.array_equal(as_bits(ours[k]), as_bits(sd[k])), k


@pytest.mark.parametrize("quant_type", [QuantType.NF4, QuantType.FP4])
def test_nested_record_matches_bnb_layout_and_tables(quant_type: QuantType) -> None:
    """Nested codes may differ from bnb's CPU LUT; keys, dtypes, shapes and both code tables must not."""
    x = randn((64, 128), torch.bfloat16, seed=7)
    sd = bnb_state_dict(NAME, x, quant_type.label, nested=True)
    ours = reference_record(NAME, x, quant_type, 64, nested=True).state_dict()
    assert list(ours) == list(sd)
    for k in sd:
        assert (ours[k].dtype, ours[k].shape[1:] if k.endswith(quant_type.label) else ours[k].shape) == (
            sd[k].dtype,
            sd[k].shape[1:] if k.endswith(quant_type.label) else sd[k].shape,
        ), k
    for suffix in ("quant_map", "nested_quant_map"):
        assert np.array_equal(as_bits(ours[f"{NAME}.{suffix}"]), as_bits(sd[f"{NAME}.{suffix}"])), suffix


def test_bnb_loads_our_record_and_dequantizes_like_us() -> None:
    import bitsandbytes.functional as bnbf

    x = randn((64, 128), torch.bfloat16, seed=11)
    rec = reference_record(NAME, x, QuantType.NF4, 64, nested=True)
    sd = rec.state_dict()
    qs = {k[len(NAME) + 1 :]: v for k, v in sd.items() if k != NAME}
    state = bnbf.QuantState.from_dict(qs, device=torch.device("cpu"))
    theirs = bnbf.dequantize_4bit(sd[NAME], state)
    assert torch.equal(theirs.view(torch.int16), rec.dequantize().view(torch.int16))


def test_quant_storage_bf16_round_trip() -> None:
    x = randn((16, 128), torch.float16, seed=2)
    sd = bnb_state_dict(NAME, x, "nf4", nested=True, quant_storage=torch.bfloat16)
    assert sd[NAME].dtype == torch.bfloat16
    rec = QuantizedTensor.from_state_dict(NAME, sd)
    assert rec.quant_storage == "bfloat16"
    assert np.array_equal(as_bits(rec.state_dict()[NAME]), as_bits(sd[NAME]))
    ours = reference_record(NAME, x, QuantType.NF4, 64, nested=False, quant_storage="bfloat16")
    assert ours.state_dict()[NAME].shape == (16 * 128 // 4, 1)


def test_stored_nested_map_is_used_not_a_constant() -> None:
    """bnb <= 0.49 on CPU wrote -1.0 at nested_quant_map[0]; the stored map must win."""
    x = randn((64, 128), torch.float32, seed=4)
    sd = bnb_state_dict(NAME, x, "nf4", nested=True)
    sd[f"{NAME}.nested_quant_map"] = sd[f"{NAME}.nested_quant_map"].clone()
    sd[f"{NAME}.nested_quant_map"][0] = -1.0
    sd[f"{NAME}.absmax"] = torch.zeros_like(sd[f"{NAME}.absmax"])  # every code -> map[0]
    rec = QuantizedTensor.from_state_dict(NAME, sd)
    assert rec.nested is not None
    expected = np.float32(-1.0) * rec.nested.nested_absmax.numpy()[0] + np.float32(rec.nested.offset)
    assert rec.absmax_f32()[0] == expected


@pytest.mark.parametrize(
    ("quant_type", "double_quant", "compute", "storage", "skip"),
    [
        (QuantType.NF4, True, "bfloat16", "uint8", ["lm_head"]),
        (QuantType.FP4, False, "float32", "bfloat16", []),
        (QuantType.NF4, False, "float16", "float32", ["lm_head", "model.layers.3.mlp.gate"]),
    ],
)
def test_quantization_config_equals_transformers(
    quant_type: QuantType, double_quant: bool, compute: str, storage: str, skip: list[str]
) -> None:
    from transformers import BitsAndBytesConfig

    theirs = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type.label,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute),
        bnb_4bit_quant_storage=storage,
        llm_int8_skip_modules=skip,
    ).to_dict()
    ours = bnb_compat.quantization_config(
        quant_type=quant_type, double_quant=double_quant, compute_dtype=compute, skip_modules=skip,
        quant_storage=storage,
    )  # fmt: skip
    assert list(ours.items()) == list(theirs.items())
    assert json.dumps(ours) == json.dumps(theirs)


def test_update_config_writes_both_dtype_keys() -> None:
    qc = bnb_compat.quantization_config(
        quant_type=QuantType.NF4, double_quant=True, compute_dtype="bfloat16", skip_modules=[]
    )
    src = {"model_type": "llama", "torch_dtype": "float32"}
    out = bnb_compat.update_config(src, qc, "bfloat16")
    assert out["dtype"] == out["torch_dtype"] == "bfloat16"
    assert out["quantization_config"] == qc
    assert src == {"model_type": "llama", "torch_dtype": "float32"}  # input untouched


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (
            b'{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [2, 64], "extra": 1}',
            "unknown: ['extra']",
        ),
        (b'{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16"}', "missing: ['shape']"),
        (
            b'{"quant_type": "fp4", "blocksize": 64, "dtype": "bfloat16", "shape": [2, 64]}',
            "does not match the key",
        ),
        (
            b'{"quant_type": "nf4", "blocksize": true, "dtype": "bfloat16", "shape": [2, 64]}',
            "blocksize True",
        ),
        (b'{"quant_type": "nf4", "blocksize": 64, "dtype": "int8", "shape": [2, 64]}', "dtype 'int8'"),
        (b'{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [-2, 64]}', "shape [-2, 64]"),
        (b"[1, 2]", "must be a JSON object"),
        (b"\xff{", "not UTF-8 JSON"),
        (
            b'{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [2, 64], '
            b'"nested_blocksize": 128, "nested_dtype": "float32", "nested_offset": 0.5}',
            "nested_blocksize 128",
        ),
        (
            b'{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [2, 64], '
            b'"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": NaN}',
            "finite",
        ),
    ],
)
def test_parse_quant_state_is_strict(payload: bytes, fragment: str) -> None:
    key = f"{NAME}.quant_state.bitsandbytes__nf4"
    with pytest.raises(BadQuantState, match="down_proj") as exc:
        bnb_compat.parse_quant_state("f.safetensors", key, payload)
    assert fragment in str(exc.value)
    assert str(exc.value).startswith("f.safetensors: tensor ")
