"""The 4-bit kernels as torch custom ops (``torch.ops.quantize_model.*``), for torch.compile and CUDA graphs.

A pybind call is opaque to dynamo (a graph break); a ``torch.library`` custom op is one node of the
graph, with a fake implementation that gives the output's shape and dtype without running anything.
So a model whose layers call these ops compiles with ``fullgraph=True`` and can be captured in a CUDA
graph (``mode="reduce-overhead"``):

- the CPU kernel is the C++ extension, the CUDA kernel ``converter.kernels.bnb4bit_cuda``'s launch, both run
  only outside tracing (so ``torch.cuda`` stream objects and data pointers are fine there);
- CUDA launches go to the current stream, allocate their output on x's device (inside a graph's
  memory pool while capturing) and never synchronise with the host;
- arguments are the tensors and plain numbers of one weight, prepared once by the caller and checked
  there (``converter.kernels.checks``); an op checks only what changes per call (x).

Ops (schemas inferred from the type hints below):

- ``gemv_4bit(x [B, K], packed, absmax?, codes?, nested_absmax?, nested_map?, offset, quant_map,
  out_features, blocksize) -> y [B, out_features]`` (x's dtype; B = 1..8, K a multiple of blocksize)
- ``dequantize_4bit(packed, absmax?, codes?, nested_absmax?, nested_map?, offset, quant_map, n,
  blocksize, dtype) -> w [n]``
- ``dequantize_nested(codes, nested_absmax, nested_map, offset) -> absmax float32 [nb]``

The absmax is either ``absmax`` (float32) or the nested record ``codes`` / ``nested_absmax`` /
``nested_map`` / ``offset`` (then ``absmax`` is None).

Adding an op for another kernel: write its CPU implementation with type hints and a fake one, and call
:func:`define` (optionally with a CUDA implementation); call it through ``torch.ops.quantize_model``.
"""

# No ``from __future__ import annotations``: torch.library reads the real type hints for the schema.

from collections.abc import Callable
from typing import Any

import torch

from converter import _kernels
from converter.kernels.bnb4bit import launch_gemv_4bit_cpu
from converter.kernels.checks import GEMV_MAX_BATCH, KERNEL_DTYPE_NAMES, NestedAbsmax
from converter.kernels.cpu_threads import gemv_threads

#: The torch.library namespace of every op of this project.
NAMESPACE = "quantize_model"


def define(name: str, cpu: Callable, fake: Callable, cuda: Callable | None = None) -> Any:
    """Register ``quantize_model::<name>``: schema from ``cpu``'s type hints, kernels per device, fake impl.

    Returns the op (callable; the same as ``getattr(torch.ops.quantize_model, name)``).
    """
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", cpu, mutates_args=(), device_types="cpu")
    if cuda is not None:
        op.register_kernel("cuda")(cuda)
    op.register_fake(fake)
    return op


def _cuda() -> Any:
    from converter.kernels import bnb4bit_cuda as kernels_cuda  # imported only when a CUDA tensor arrives

    return kernels_cuda


def _nested(
    codes: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_map: torch.Tensor | None,
    offset: float,
) -> NestedAbsmax | None:
    return None if codes is None else NestedAbsmax(codes, nested_absmax, offset, nested_map)


def _check_x(x: torch.Tensor, packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """x is the one per-call argument: [B, K] with B = 1..GEMV_MAX_BATCH, a float dtype, on the weight's
    device; returned contiguous."""
    if x.device != packed.device:
        msg = f"x is on {x.device} but the 4-bit weight is on {packed.device}: move them to one device"
        raise ValueError(msg)
    if x.dim() != 2 or not 1 <= x.shape[0] <= GEMV_MAX_BATCH or x.shape[1] != in_features:
        msg = f"x has shape {tuple(x.shape)}: the fused GEMV takes [1..{GEMV_MAX_BATCH}, {in_features}]"
        raise ValueError(msg)
    if x.dtype not in KERNEL_DTYPE_NAMES:
        msg = f"x has dtype {x.dtype}: expected float32, float16 or bfloat16"
        raise ValueError(msg)
    return x.contiguous()


# -- dequantize_nested ---------------------------------------------------------------------------------


def _dequantize_nested_cpu(
    codes: torch.Tensor, nested_absmax: torch.Tensor, nested_map: torch.Tensor, offset: float
) -> torch.Tensor:
    out = torch.empty(codes.numel(), dtype=torch.float32)
    _kernels.dequantize_nested(
        codes.data_ptr(),
        codes.numel(),
        nested_absmax.data_ptr(),
        float(offset),
        nested_map.data_ptr(),
        out.data_ptr(),
        0,
    )
    return out


def _dequantize_nested_cuda(
    codes: torch.Tensor, nested_absmax: torch.Tensor, nested_map: torch.Tensor, offset: float
) -> torch.Tensor:
    return _cuda()._launch_dequantize_nested(codes, nested_absmax, offset, nested_map)


def _dequantize_nested_fake(
    codes: torch.Tensor, nested_absmax: torch.Tensor, nested_map: torch.Tensor, offset: float
) -> torch.Tensor:
    return codes.new_empty((codes.numel(),), dtype=torch.float32)


dequantize_nested = define(
    "dequantize_nested", _dequantize_nested_cpu, _dequantize_nested_fake, _dequantize_nested_cuda
)


# -- dequantize_4bit -----------------------------------------------------------------------------------


def _dequantize_4bit_cpu(
    packed: torch.Tensor,
    absmax: torch.Tensor | None,
    codes: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_map: torch.Tensor | None,
    offset: float,
    quant_map: torch.Tensor,
    n: int,
    blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    if absmax is None:  # the CPU kernel takes a float32 absmax: decode the nested one first
        absmax = _dequantize_nested_cpu(codes, nested_absmax, nested_map, offset)
    out = torch.empty(n, dtype=dtype)
    _kernels.dequantize_4bit(
        packed.data_ptr(),
        absmax.data_ptr(),
        n,
        blocksize,
        quant_map.data_ptr(),
        out.data_ptr(),
        KERNEL_DTYPE_NAMES[dtype],
        "auto",
        0,
    )
    return out


def _dequantize_4bit_cuda(
    packed: torch.Tensor,
    absmax: torch.Tensor | None,
    codes: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_map: torch.Tensor | None,
    offset: float,
    quant_map: torch.Tensor,
    n: int,
    blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    nested = _nested(codes, nested_absmax, nested_map, offset)
    return _cuda()._launch_dequantize_4bit(packed, absmax, n, blocksize, quant_map, dtype, None, nested)


def _dequantize_4bit_fake(
    packed: torch.Tensor,
    absmax: torch.Tensor | None,
    codes: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_map: torch.Tensor | None,
    offset: float,
    quant_map: torch.Tensor,
    n: int,
    blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    return packed.new_empty((n,), dtype=dtype)


dequantize_4bit = define(
    "dequantize_4bit", _dequantize_4bit_cpu, _dequantize_4bit_fake, _dequantize_4bit_cuda
)


# -- gemv_4bit -------------------------------------------------------------------------------------------


def _gemv_4bit_cpu(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor | None,
    codes: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_map: torch.Tensor | None,
    offset: float,
    quant_map: torch.Tensor,
    out_features: int,
    blocksize: int,
) -> torch.Tensor:
    in_features = packed.numel() * 2 // out_features
    x = _check_x(x, packed, in_features)
    return launch_gemv_4bit_cpu(
        x,
        packed,
        absmax,
        _nested(codes, nested_absmax, nested_map, offset),
        quant_map,
        batch=x.shape[0],
        out_features=out_features,
        in_features=in_features,
        blocksize=blocksize,
        isa="auto",
        threads=gemv_threads(packed.numel()),
    )


def _gemv_4bit_cuda(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor | None,
    codes: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_map: torch.Tensor | None,
    offset: float,
    quant_map: torch.Tensor,
    out_features: int,
    blocksize: int,
) -> torch.Tensor:
    in_features = packed.numel() * 2 // out_features
    x = _check_x(x, packed, in_features)
    nested = _nested(codes, nested_absmax, nested_map, offset)
    return _cuda()._launch_gemv_4bit(
        x, packed, absmax, out_features, in_features, blocksize, quant_map, nested
    )


def _gemv_4bit_fake(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor | None,
    codes: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_map: torch.Tensor | None,
    offset: float,
    quant_map: torch.Tensor,
    out_features: int,
    blocksize: int,
) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features))


gemv_4bit = define("gemv_4bit", _gemv_4bit_cpu, _gemv_4bit_fake, _gemv_4bit_cuda)

#: The real implementations by device type, for eager callers that skip the dispatcher (see
#: converter.loader.ops: the same functions the ops run, without the per-call dispatch cost).
IMPLS: dict[str, dict[str, Callable]] = {
    "cpu": {
        "gemv_4bit": _gemv_4bit_cpu,
        "dequantize_4bit": _dequantize_4bit_cpu,
        "dequantize_nested": _dequantize_nested_cpu,
    },
    "cuda": {
        "gemv_4bit": _gemv_4bit_cuda,
        "dequantize_4bit": _dequantize_4bit_cuda,
        "dequantize_nested": _dequantize_nested_cuda,
    },
}
