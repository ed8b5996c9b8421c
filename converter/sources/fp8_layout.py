"""What a block-scaled FP8 checkpoint looks like, from config.json and the tensor list alone.

No torch and no Source import: ``converter.sources.base`` asks these questions to decide whether a
source is "already quantized", and ``converter.sources.fp8`` (torch, the dequantizing wrapper) uses the same
answers, so neither has to import the other lazily.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from converter.sources.base import TensorInfo

SCALE_SUFFIX = "_scale_inv"
#: safetensors dtypes of the FP8 weights that are dequantized (converter/sources/fp8.py maps them to torch).
FP8_WEIGHT_DTYPE_NAMES = ("F8_E4M3",)
_SCALE_DTYPES = {"F32", "BF16", "F16"}


def block_size(config: dict | None) -> tuple[int, int] | None:
    """(rows, cols) of the scale blocks when config.json declares block-scaled FP8, else None."""
    qc = (config or {}).get("quantization_config")
    if not isinstance(qc, dict) or str(qc.get("quant_method", "")).lower() != "fp8":
        return None
    bs = qc.get("weight_block_size")
    if not (isinstance(bs, list | tuple) and len(bs) == 2 and all(isinstance(b, int) and b > 0 for b in bs)):
        return None
    return int(bs[0]), int(bs[1])


def block_fp8_problem(config: dict | None, tensors: list[TensorInfo]) -> str | None:
    """Why a source that declares block FP8 cannot be dequantized (None when it can, or is not FP8)."""
    bs = block_size(config)
    if bs is None:
        return "not a block-scaled FP8 checkpoint"
    by_name = {t.name: t for t in tensors}
    for t in tensors:
        if t.name.endswith(SCALE_SUFFIX):
            continue
        if t.dtype.startswith("F8") or t.dtype == "F4":
            if t.dtype not in FP8_WEIGHT_DTYPE_NAMES:
                return f"tensor {t.name!r} is {t.dtype} (only F8_E4M3 with block scales is dequantized)"
            scale = by_name.get(t.name + SCALE_SUFFIX)
            if scale is None:
                return f"FP8 tensor {t.name!r} has no {t.name + SCALE_SUFFIX!r}"
            if len(t.shape) != 2:
                return f"FP8 tensor {t.name!r} has shape {list(t.shape)}, not 2-D"
            want = (math.ceil(t.shape[0] / bs[0]), math.ceil(t.shape[1] / bs[1]))
            if tuple(scale.shape) != want or scale.dtype not in _SCALE_DTYPES:
                return (
                    f"{scale.name!r} is {scale.dtype} {list(scale.shape)}; {t.name!r} {list(t.shape)} "
                    f"with {bs[0]}x{bs[1]} blocks needs float {list(want)}"
                )
    return None


def is_block_fp8(config: dict | None, tensors: list[TensorInfo]) -> bool:
    """True for a checkpoint this module dequantizes (so the source must not refuse it)."""
    return block_size(config) is not None and block_fp8_problem(config, tensors) is None
