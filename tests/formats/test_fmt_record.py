"""QuantizedTensor: state-dict round trips, planned slots, and refusals with named errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fmt_helpers import as_bits, randn, reference_record

from formats.quant_types import QuantType
from formats.record import QuantizedTensor
from formats.validate import (
    BadQuantState,
    MissingQuantComponent,
    QuantLayoutMismatch,
    UnexpectedQuantComponent,
    UnsupportedOption,
)

NAME = "model.layers.1.self_attn.q_proj.weight"


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", [QuantType.NF4, QuantType.FP4])
@pytest.mark.parametrize("shape", [(7, 9), (3, 64), (1,), (2, 3, 100), (300, 260)])
def test_state_dict_round_trip(shape: tuple[int, ...], quant_type: QuantType, nested: bool) -> None:
    rec = reference_record(NAME, randn(shape, torch.bfloat16), quant_type, 32, nested)
    sd = rec.state_dict()
    back = QuantizedTensor.from_state_dict(
        NAME, {**sd, "model.layers.1.self_attn.q_proj.bias": torch.ones(3)}
    )
    assert (back.shape, back.quant_type, back.blocksize) == (shape, quant_type, 32)
    for k, v in back.state_dict().items():
        assert np.array_equal(as_bits(v), as_bits(sd[k])), k
    assert torch.equal(back.dequantize().view(torch.int16), rec.dequantize().view(torch.int16))


@pytest.mark.parametrize("nested", [False, True])
def test_plan_slots_match_state_dict(nested: bool) -> None:
    rec = reference_record(NAME, randn((33, 64), torch.float16), QuantType.NF4, 64, nested, "float16")
    slots = QuantizedTensor.plan_slots(NAME, (33, 64), "float16", QuantType.NF4, 64, nested, "float16")
    sd = rec.state_dict()
    assert [s.name for s in slots] == list(sd)
    for s in slots:
        if s.shape is None:
            assert (s.dtype, s.name) == ("U8", f"{NAME}.quant_state.bitsandbytes__nf4")
        else:
            assert tuple(sd[s.name].shape) == s.shape


def test_odd_tail_is_padded_with_zero_code() -> None:
    x = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float32)
    rec = reference_record("w.weight", x, QuantType.NF4, 64, nested=False)
    assert rec.packed_bytes().tolist() == [0xF0, 0xF7]


def test_refuses_wrong_absmax_size() -> None:
    rec = reference_record(NAME, randn((4, 64), torch.float32), QuantType.NF4, 64, nested=False)
    with pytest.raises(QuantLayoutMismatch, match=r"absmax.*expected F32 \[4\].*got F32 \[3\]"):
        QuantizedTensor(
            NAME, rec.shape, rec.dtype, rec.quant_type, 64, rec.packed, rec.absmax[:3], rec.quant_map
        )


def test_refuses_wrong_packed_size() -> None:
    rec = reference_record(NAME, randn((4, 64), torch.float32), QuantType.NF4, 64, nested=False)
    with pytest.raises(QuantLayoutMismatch, match=r"expected U8 \[128, 1\]"):
        QuantizedTensor(
            NAME, rec.shape, rec.dtype, rec.quant_type, 64, rec.packed[:-1], rec.absmax, rec.quant_map
        )


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"dtype": "int8"}, "dtype 'int8' cannot be quantized"),
        ({"blocksize": 48}, "blocksize 48 not supported"),
        ({"quant_storage": "int4"}, "quant_storage 'int4' not supported"),
        ({"shape": (0, 64)}, "empty tensor"),
        ({"shape": (3, 1), "quant_storage": "float32"}, "not a whole number of float32 items"),
    ],
)
def test_plan_refuses_unsupported(kwargs: dict, fragment: str) -> None:
    args = {"shape": (4, 64), "dtype": "bfloat16", "blocksize": 64, "quant_storage": "uint8", **kwargs}
    with pytest.raises(UnsupportedOption, match=NAME.replace(".", r"\.")) as exc:
        QuantizedTensor.plan_slots(NAME, args["shape"], args["dtype"], QuantType.NF4, args["blocksize"], True,
                                   args["quant_storage"])  # fmt: skip
    assert fragment in str(exc.value)


def test_from_state_dict_errors() -> None:
    sd = reference_record(NAME, randn((4, 64), torch.float32), QuantType.NF4, 64, nested=True).state_dict()
    with pytest.raises(MissingQuantComponent, match="not a bnb 4-bit weight"):
        QuantizedTensor.from_state_dict("other.weight", sd)
    missing = {k: v for k, v in sd.items() if not k.endswith("nested_absmax")}
    with pytest.raises(MissingQuantComponent, match="nested_absmax"):
        QuantizedTensor.from_state_dict(NAME, missing)
    with pytest.raises(
        UnexpectedQuantComponent, match=r"\['model\.layers\.1\.self_attn\.q_proj\.weight\.SCB'\]"
    ):
        QuantizedTensor.from_state_dict(NAME, {**sd, f"{NAME}.SCB": torch.ones(1)})
    wrong = dict(sd)
    wrong[f"{NAME}.absmax"] = sd[f"{NAME}.absmax"].float()
    with pytest.raises(QuantLayoutMismatch, match=r"absmax.*expected U8 \[4\]"):
        QuantizedTensor.from_state_dict(NAME, wrong)
    bad_js = dict(sd)
    bad_js[f"{NAME}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b'{"x": 1}'), dtype=torch.uint8)
    with pytest.raises(BadQuantState):
        QuantizedTensor.from_state_dict(NAME, bad_js)


def test_offset_must_be_float32() -> None:
    rec = reference_record(NAME, randn((4, 64), torch.float32), QuantType.NF4, 64, nested=True)
    assert rec.nested is not None
    with pytest.raises(QuantLayoutMismatch, match="not a float32 value"):
        QuantizedTensor.from_kernel_outputs(
            NAME, rec.shape, rec.dtype, rec.quant_type, 64, rec.packed, rec.absmax,
            (rec.absmax, rec.nested.nested_absmax, 0.1),
        )  # fmt: skip
