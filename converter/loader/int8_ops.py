"""Dequantize and GEMV of LLM.int8 weights for the loader, as torch custom ops.

``torch.ops.quantize_model.dequantize_int8(codes, scb, dtype)`` and ``gemv_int8(x, codes, scb, bias)`` are
``torch.library`` custom ops (one graph node each under torch.compile, with fake implementations),
the namespace and convention of the 4-bit ops. CPU tensors run the C++ kernels
(``converter.kernels.int8``); CUDA tensors the CUDA kernels when the extension has them; any other
device (or a build without the extension) the torch formula below, which computes the same bits:
``W = f32(f32(q * SCB) * f32(1/127))`` then one round-to-nearest-even cast.
"""

# No ``from __future__ import annotations``: torch.library reads the real type hints for the schema.

import functools
from typing import Any

import torch

from converter.kernels.checks import KERNEL_DTYPE_NAMES
from converter.loader import dynamo_marks
from converter.loader.ops import check_compute_dtype
from formats.int8 import INV127

#: Largest token count of the fused GEMV.
GEMV_MAX_TOKENS = 8
_INV127 = float(INV127)


@functools.cache
def _kernels() -> Any:
    """converter.kernels.int8 when the C++ extension imports, else None (torch path)."""
    try:
        from converter.kernels import int8 as kernels_int8
    except (ImportError, AttributeError, OSError):
        return None
    return kernels_int8


@functools.cache
def _has_cuda_int8() -> bool:
    try:
        from converter.kernels import bnb4bit_cuda as kernels_cuda
        from converter.kernels import int8_cuda as kernels_int8_cuda
    except (ImportError, AttributeError, OSError, RuntimeError):
        return False
    return kernels_int8_cuda.available() and kernels_cuda.cuda_status()[0]


def _dequantize_torch(codes: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    w = codes.to(torch.float32) * scb.to(torch.float32).unsqueeze(1)  # one f32 product
    return (w * _INV127).to(dtype)  # a separate f32 product, then one cast


@torch.library.custom_op("quantize_model::dequantize_int8", mutates_args=())
def _dequantize_op(codes: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    k = _kernels()
    if codes.device.type == "cpu" and k is not None:
        return k.dequantize_int8(codes.contiguous(), scb.contiguous(), out_dtype=dtype)
    if codes.is_cuda and k is not None and _has_cuda_int8():
        return k.dequantize_int8(codes.contiguous(), scb.contiguous(), out_dtype=dtype)
    return _dequantize_torch(codes, scb, dtype)


@_dequantize_op.register_fake
def _(codes: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return codes.new_empty(codes.shape, dtype=dtype)


@torch.library.custom_op("quantize_model::gemv_int8", mutates_args=(), device_types="cpu")
def _gemv_op(
    x: torch.Tensor, codes: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return _kernels().gemv_int8(x.contiguous(), codes, scb, bias)


@_gemv_op.register_kernel("cuda")
def _(
    x: torch.Tensor, codes: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    # csrc/cuda/gemv_int8.cu on torch's current stream, no host sync: capturable in a CUDA graph.
    return _kernels().gemv_int8(x.contiguous(), codes, scb, bias)


@_gemv_op.register_fake
def _(
    x: torch.Tensor, codes: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return x.new_empty((x.shape[0], codes.shape[0]))


def dequantize(codes: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight [out, in] in ``dtype``; float64 (no kernel dtype): the float32 weight, cast (exact)."""
    if dtype not in KERNEL_DTYPE_NAMES:
        check_compute_dtype(dtype)
        return torch.ops.quantize_model.dequantize_int8(codes, scb, torch.float32).to(dtype)
    return torch.ops.quantize_model.dequantize_int8(codes, scb, dtype)


@functools.cache
def _cuda_gemv_built() -> bool:
    if not _has_cuda_int8():
        return False
    from converter.kernels import int8_cuda as kernels_int8_cuda

    return kernels_int8_cuda.has_gemv()


@dynamo_marks.assume_constant_result
def _has_cuda_gemv() -> bool:
    """Whether the CUDA int8 GEMV is usable; a constant to dynamo (it asks the extension through
    pybind, which dynamo cannot trace: without this, fullgraph=True would fail on CUDA inputs)."""
    return _cuda_gemv_built()


def gemv_ok(x2d: torch.Tensor) -> bool:
    """Whether the fused GEMV takes this call: 1..8 tokens of a kernel dtype (float64 takes the
    dequantize path) on the CPU (C++ kernels present) or on a CUDA device (the extension's CUDA
    backend has the int8 GEMV)."""
    if not 1 <= x2d.shape[0] <= GEMV_MAX_TOKENS or x2d.dtype not in KERNEL_DTYPE_NAMES or _kernels() is None:
        return False
    return x2d.device.type == "cpu" or (x2d.is_cuda and _has_cuda_gemv())


def gemv(
    x2d: torch.Tensor, codes: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y [B, out] = x2d @ W.T (+ bias) through the fused kernel (float32 sums, x's dtype out; the
    bias added as ``y + bias`` in x's dtype)."""
    return torch.ops.quantize_model.gemv_int8(x2d, codes, scb, bias)
