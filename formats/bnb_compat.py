"""What bitsandbytes and transformers expect to find: quant-state JSON bytes and config.json fields.

The JSON bytes are byte-identical to bitsandbytes' ``QuantState.as_dict(packed=True)`` (which calls
``json.dumps`` with default separators and a fixed key order); the ``quantization_config`` dict has
exactly the keys, order and values of transformers 5.24 ``BitsAndBytesConfig.to_dict()``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from formats.quant_types import NESTED_BLOCKSIZE, QuantType
from formats.validate import (
    STORAGE_CODES,
    WEIGHT_DTYPES,
    QuantStateInfo,
    UnsupportedOption,
    parse_quant_state,
)

__all__ = [
    "QuantStateInfo",
    "parse_quant_state",
    "quant_state_json",
    "quant_state_key",
    "quantization_config",
    "update_config",
]


def quant_state_key(name: str, quant_type: QuantType) -> str:
    """``<weight key>.quant_state.bitsandbytes__nf4`` (or ``__fp4``)."""
    return f"{name}.quant_state.bitsandbytes__{quant_type.label}"


def quant_state_json(
    quant_type: QuantType,
    blocksize: int,
    dtype: str,
    shape: Sequence[int],
    nested_offset: float | None,
) -> bytes:
    """bnb's packed quant state, byte for byte.

    ``nested_offset`` is a float32 value (None when not nested); bnb writes ``offset.item()``, i.e. the
    float32 widened to a Python float, printed by ``repr`` (shortest round-trip form).
    """
    if dtype not in WEIGHT_DTYPES:
        msg = f"dtype {dtype!r} is not one of {list(WEIGHT_DTYPES)}"
        raise UnsupportedOption(msg)
    state: dict[str, Any] = {
        "quant_type": quant_type.label,
        "blocksize": int(blocksize),
        "dtype": dtype,
        "shape": [int(d) for d in shape],
    }
    if nested_offset is not None:
        state["nested_blocksize"] = NESTED_BLOCKSIZE
        state["nested_dtype"] = "float32"
        state["nested_offset"] = float(np.float32(nested_offset))
    return json.dumps(state).encode("utf-8")


def quantization_config(
    *,
    quant_type: QuantType,
    double_quant: bool,
    compute_dtype: str,
    skip_modules: Sequence[str],
    quant_storage: str = "uint8",
) -> dict[str, Any]:
    """transformers' ``quantization_config`` for a pre-quantized bnb 4-bit checkpoint.

    ``skip_modules`` is written as an explicit ``llm_int8_skip_modules`` list: transformers then uses
    it instead of its own default skip set, so the modules it turns into Linear4bit are exactly the
    ones we quantized.
    """
    if compute_dtype not in WEIGHT_DTYPES:
        msg = f"compute dtype {compute_dtype!r} is not one of {list(WEIGHT_DTYPES)}"
        raise UnsupportedOption(msg)
    if quant_storage not in STORAGE_CODES:
        msg = f"quant_storage {quant_storage!r} is not one of {list(STORAGE_CODES)}"
        raise UnsupportedOption(msg)
    return {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": False,
        "_load_in_4bit": True,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": list(skip_modules),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": quant_type.label,
        "bnb_4bit_use_double_quant": bool(double_quant),
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": quant_storage,
        "load_in_4bit": True,
        "load_in_8bit": False,
    }


def update_config(config: Mapping[str, Any], qconfig: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    """A copy of a config.json dict with ``quantization_config`` and the model dtype added.

    ``dtype`` is the dtype of the non-quantized tensors (and of dequantized weights); it goes to both
    ``"dtype"`` (transformers 5.x) and ``"torch_dtype"`` (4.x).
    """
    if dtype not in WEIGHT_DTYPES:
        msg = f"model dtype {dtype!r} is not one of {list(WEIGHT_DTYPES)}"
        raise UnsupportedOption(msg)
    out = dict(config)
    out["quantization_config"] = dict(qconfig)
    out["dtype"] = dtype
    out["torch_dtype"] = dtype
    return out
