"""Dequantize and GEMV for the loader: the C++/CUDA kernels when present, plain torch otherwise.

Every path computes the same bits (design.md, exactness rules): nested absmax decoded as
``map8[c] * nested_absmax`` then ``+ offset`` (two float32 operations, no FMA), weights as
``quant_map[q] * absmax`` in float32 and one round-to-nearest-even cast. The torch path exists for
CUDA tensors when the extension has no CUDA backend, for devices without kernels (MPS, XPU) and
for an install where the C++ extension is missing; it is slower, never different.

A quant state here is anything with bitsandbytes' ``QuantState`` attribute names (``absmax``,
``shape``, ``code``, ``dtype``, ``blocksize``, ``quant_type``, ``offset``, ``state2``, ``nested``):
bnb's own class when bitsandbytes is installed, :class:`converter.loader.module.QuantState4bit`
otherwise. Both are read the same way, so a weight that PEFT re-quantized with bnb still works.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from formats.quant_types import NESTED_BLOCKSIZE

#: Largest token count the fused GEMV takes (the kernel is written for batch 1..8).
GEMV_MAX_TOKENS = 8


@functools.cache
def _kernels() -> Any | None:
    """converter.kernels when its extension imports, else None (the torch path is used)."""
    try:
        from converter import kernels

        kernels.available_backends()
    except (ImportError, AttributeError, OSError):
        return None
    return kernels


@functools.cache
def _backends() -> dict:
    k = _kernels()
    return k.available_backends() if k is not None else {}


def kernel_backend(device: torch.device) -> Any | None:
    """The kernels module if it has a backend for ``device`` ("cpu" or "cuda"), else None."""
    k = _kernels()
    if k is None or device.type not in _backends():
        return None
    return k


def packed_bytes(packed: torch.Tensor) -> torch.Tensor:
    """The packed codes as a flat uint8 tensor (quant_storage other than uint8 is the same bytes)."""
    flat = packed.contiguous().reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def _offset_value(offset: Any) -> float:
    return float(offset.item() if isinstance(offset, torch.Tensor) else offset)


def decoded_absmax(state: Any) -> torch.Tensor:
    """float32 absmax [nb] of a state: stored as is, or decoded from the nested codes."""
    if not state.nested:
        return state.absmax.float() if state.absmax.dtype != torch.float32 else state.absmax
    state2 = state.state2
    codes = state.absmax.reshape(-1)
    k = kernel_backend(codes.device)
    if k is not None:
        return k.dequantize_nested(
            codes.contiguous(),
            state2.absmax.contiguous(),
            _offset_value(state.offset),
            state2.code.float().contiguous(),
        )
    nb = codes.numel()
    scale = state2.absmax.float().repeat_interleave(NESTED_BLOCKSIZE)[:nb]
    offset = torch.tensor(_offset_value(state.offset), dtype=torch.float32, device=codes.device)
    # Two separate float32 kernels: a product, then a sum (never fused into an FMA).
    return state2.code.float()[codes.long()] * scale + offset


def dequantize(packed: torch.Tensor, state: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight of ``state.shape`` in ``dtype`` (default: the state's own dtype)."""
    dtype = dtype or state.dtype
    shape = tuple(state.shape)
    n = math.prod(shape)
    data = packed_bytes(packed)
    absmax = decoded_absmax(state)
    quant_map = state.code.float().contiguous()
    k = kernel_backend(data.device)
    if k is not None:
        out = k.dequantize_4bit(
            data, absmax.contiguous(), n=n, blocksize=state.blocksize, quant_map=quant_map, out_dtype=dtype
        )
        return out.reshape(shape)
    return _dequantize_torch(data, absmax, n, state.blocksize, quant_map, dtype).reshape(shape)


def _dequantize_torch(
    data: torch.Tensor,
    absmax: torch.Tensor,
    n: int,
    blocksize: int,
    quant_map: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    # One lookup of both nibbles per byte: first element in the high nibble.
    pairs = torch.stack((quant_map.repeat_interleave(16), quant_map.repeat(16)), dim=1)  # [256, 2]
    values = pairs[data.long()].reshape(-1)[:n]
    scale = absmax.repeat_interleave(blocksize)[:n]
    return (values * scale).to(dtype)


def gemv_ok(x2d: torch.Tensor, in_features: int, state: Any) -> bool:
    """Whether the fused GEMV takes this call: CPU/CUDA kernel present, 1..8 tokens, whole blocks per row."""
    if x2d.shape[0] < 1 or x2d.shape[0] > GEMV_MAX_TOKENS or in_features % state.blocksize:
        return False
    k = kernel_backend(x2d.device)
    return k is not None and hasattr(k, "gemv_4bit")


def _gemv_args(packed: torch.Tensor, state: Any) -> dict:
    """The kernel arguments of one weight, prepared once and kept on its quant state.

    Keyed by the data pointers, so a state whose tensors were moved or replaced in place (bnb's
    ``QuantState.to``) is prepared again.
    """
    tensors = (packed, state.absmax, state.code) + ((state.state2.absmax, state.state2.code, state.offset)
                                                      if state.nested else ())  # fmt: skip
    key = tuple(t.data_ptr() for t in tensors)
    cached = getattr(state, "_qm_gemv", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    args: dict[str, Any] = {"packed": packed_bytes(packed), "quant_map": state.code.float().contiguous()}
    if state.nested:
        args["absmax"] = None
        args["nested"] = (
            state.absmax.reshape(-1).contiguous(),
            state.state2.absmax.contiguous(),
            _offset_value(state.offset),
            state.state2.code.float().contiguous(),
        )
    else:
        args["absmax"] = state.absmax.float().contiguous()
        args["nested"] = None
    state._qm_gemv = (key, args)
    return args


def gemv(x2d: torch.Tensor, packed: torch.Tensor, state: Any, out_features: int, in_features: int):
    """y [B, out_features] = x2d @ W.T through the fused kernel (nested absmax decoded inline)."""
    k = kernel_backend(x2d.device)
    args = _gemv_args(packed, state)
    return k.gemv_4bit(
        x2d.contiguous(),
        args["packed"],
        args["absmax"],
        out_features=out_features,
        in_features=in_features,
        blocksize=state.blocksize,
        quant_map=args["quant_map"],
        nested=args["nested"],
    )
