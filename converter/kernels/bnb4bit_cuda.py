"""CUDA backend of ``converter.kernels.bnb4bit``: the same functions, the same bytes, on CUDA tensors.

``converter.kernels.bnb4bit`` validates arguments and dispatches CUDA tensors here; this module allocates the
outputs on the input's device, launches the kernels of ``csrc/cuda`` on the current torch stream and
returns torch tensors. Results are byte-identical to the CPU kernels and ``formats.reference``
(design.md, exactness rules), except ``gemv_4bit`` (float32 accumulation, tolerance-tested).

Two additions over the CPU interface, for GPU throughput:

- ``quantize_4bit_nested(x, ...)`` quantizes and nests in one go with a single host synchronisation.
- ``dequantize_4bit(..., nested=NestedAbsmax)`` decodes a nested absmax inline (no un-nested copy).

Backend discovery: ``cuda_status()`` -> ``(usable, reason)``; ``backend_info()`` -> dict or None
(used by ``converter.kernels.bnb4bit.available_backends``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cache
from typing import NamedTuple

import torch

from converter import _kernels
from converter.kernels.checks import (
    KERNEL_DTYPE_CODES,
    NestedAbsmax,
    NonFiniteInputError,
    check_dequantize_args,
    check_dequantize_nested_args,
    check_gemv_args,
)
from converter.kernels.cuda_launch import current_stream, device_index
from converter.quantize import cuda_host
from formats import codebooks
from formats.quant_types import OFFSET_CHUNK, QuantType, check_blocksize, n_blocks, n_nested_blocks

__all__ = [
    "backend_info",
    "cuda_status",
    "dequantize_4bit",
    "dequantize_nested",
    "gemv_4bit",
    "quantize_4bit",
    "quantize_4bit_nested",
    "quantize_nested",
]

#: ``QM_CUDA_GEMV`` values -> gemv_4bit variant codes (csrc/cuda/qm_cuda.h): which CUDA GEMV kernel
#: runs when the caller does not force one. ``auto`` (default): the per-shape choice of csrc/cuda;
#: ``stream``: the lean tensor-core kernel (gemv_stream.cu) where its layout conditions hold;
#: ``mma``: the tensor-core kernel of gemv_mma.cu; ``cuda-core``: the CUDA-core kernel (gemv.cu).
GEMV_KERNELS = {"auto": 0, "stream": 11, "mma": 20, "cuda-core": 10}


def _gemv_default_variant() -> int:
    name = os.environ.get("QM_CUDA_GEMV", "auto").strip().lower() or "auto"
    if name not in GEMV_KERNELS:
        msg = f"QM_CUDA_GEMV={name!r}: expected one of {', '.join(GEMV_KERNELS)}"
        raise ValueError(msg)
    return GEMV_KERNELS[name]


#: Read once at import: the GEMV kernel that variant 0 means for this process.
GEMV_DEFAULT_VARIANT = _gemv_default_variant()


@cache
def cuda_status() -> tuple[bool, str]:
    """``(usable, reason)``: usable is False with a one-line reason (no CUDA build, no device, old
    driver, a GPU older than compute capability 8.0: ``converter.quantize.cuda_host.cuda_status``, or a torch
    that sees no GPU)."""
    usable, why = cuda_host.cuda_status()
    if usable and not torch.cuda.is_available():
        return False, "torch reports no usable CUDA device (a CPU-only torch build?)"
    return usable, why


def backend_info() -> dict | None:
    """``{"devices": [{"name", "capability", "multiprocessors", "total_memory", "l2_bytes"}, ...]}``.

    None when the CUDA backend is not usable (``cuda_status()`` says why).
    """
    return cuda_host.backend_info() if cuda_status()[0] else None


def _require(x: torch.Tensor, name: str) -> int:
    if not x.is_cuda:
        msg = f"{name} is on {x.device}: the CUDA kernels take CUDA tensors"
        raise ValueError(msg)
    if not x.is_contiguous():
        msg = f"{name} is not contiguous (shape {tuple(x.shape)}): call .contiguous()"
        raise ValueError(msg)
    usable, why = cuda_status()
    if not usable:
        raise RuntimeError(why)
    return device_index(x.device)


@cache
def _device_table(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def _mids(device: torch.device) -> torch.Tensor:
    return _device_table(codebooks.DYNAMIC8_MIDPOINTS, device)


def _launch_quantize(
    x: torch.Tensor, blocksize: int, quant_type: QuantType
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dev = _require(x, "x")
    if x.dtype not in KERNEL_DTYPE_CODES:
        msg = f"x has dtype {x.dtype}: expected float32, float16 or bfloat16"
        raise ValueError(msg)
    check_blocksize(blocksize)
    n = x.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks(n, blocksize), dtype=torch.float32, device=x.device)
    flag = torch.zeros(1, dtype=torch.int32, device=x.device)
    _kernels.cuda_quantize_4bit(
        dev,
        x.data_ptr(),
        KERNEL_DTYPE_CODES[x.dtype],
        n,
        blocksize,
        int(quant_type),
        packed.data_ptr(),
        absmax.data_ptr(),
        flag.data_ptr(),
        current_stream(x.device),
    )
    return packed, absmax, flag


def _launch_nested(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dev = _require(absmax, "absmax")
    nb = absmax.numel()
    codes = torch.empty(nb, dtype=torch.uint8, device=absmax.device)
    nested_absmax = torch.empty(n_nested_blocks(nb), dtype=torch.float32, device=absmax.device)
    # scratch: per-chunk float64 sums, then per-chunk exponent ranges (csrc/cuda/quantize.cu)
    sums = torch.empty(max(2, 2 * -(-nb // OFFSET_CHUNK)), dtype=torch.float64, device=absmax.device)
    offset = torch.empty(1, dtype=torch.float32, device=absmax.device)
    _kernels.cuda_quantize_nested(
        dev,
        absmax.data_ptr(),
        nb,
        _mids(absmax.device).data_ptr(),
        sums.data_ptr(),
        offset.data_ptr(),
        codes.data_ptr(),
        nested_absmax.data_ptr(),
        current_stream(absmax.device),
    )
    return codes, nested_absmax, offset


def _raise_nonfinite(flag: torch.Tensor, n: int, blocksize: int) -> None:
    if int(flag.item()):
        raise NonFiniteInputError.in_tensor(n, blocksize)  # the CPU path's exception: one type to catch


def quantize_4bit(
    x: torch.Tensor, *, blocksize: int, quant_type: QuantType
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed uint8 [(n+1)//2], absmax float32 [nb])`` on x's device; see ``converter.kernels.bnb4bit``.

    Synchronises with the stream once (to raise NonFiniteInputError on NaN/Inf).
    """
    packed, absmax, flag = _launch_quantize(x, blocksize, quant_type)
    _raise_nonfinite(flag, x.numel(), blocksize)
    return packed, absmax


def quantize_nested(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(codes uint8 [nb], nested_absmax float32 [ceil(nb/256)], offset)``; see
    ``converter.kernels.bnb4bit``."""
    if absmax.dtype != torch.float32:
        msg = f"absmax has dtype {absmax.dtype}, expected float32"
        raise ValueError(msg)
    if absmax.numel() and not bool(torch.isfinite(absmax).all()):
        raise NonFiniteInputError.in_absmax()  # the CPU path's exception: one type to catch
    codes, nested_absmax, offset = _launch_nested(absmax)
    return codes, nested_absmax, float(offset.item())


def quantize_4bit_nested(
    x: torch.Tensor, *, blocksize: int, quant_type: QuantType
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Quantize and nest in one go: ``(packed, codes, nested_absmax, offset)``, one host synchronisation.

    Equal to ``quantize_4bit`` followed by ``quantize_nested``.
    """
    packed, absmax, flag = _launch_quantize(x, blocksize, quant_type)
    codes, nested_absmax, offset = _launch_nested(absmax)
    both = torch.cat([flag.to(torch.float32), offset])  # one copy to the host for both scalars
    bad, off = both.tolist()
    if bad:
        raise NonFiniteInputError.in_tensor(x.numel(), blocksize)  # the CPU path's exception
    return packed, codes, nested_absmax, float(off)


def dequantize_nested(
    codes: torch.Tensor, nested_absmax: torch.Tensor, offset: float, nested_map: torch.Tensor
) -> torch.Tensor:
    """absmax float32 [nb] = nested_map[codes] * nested_absmax[i // 256] + offset (separate ops)."""
    check_dequantize_nested_args(codes, nested_absmax, nested_map)
    return _launch_dequantize_nested(codes, nested_absmax, offset, nested_map)


def _launch_dequantize_nested(
    codes: torch.Tensor, nested_absmax: torch.Tensor, offset: float, nested_map: torch.Tensor
) -> torch.Tensor:
    dev = _require(codes, "codes")
    nb = codes.numel()
    out = torch.empty(nb, dtype=torch.float32, device=codes.device)
    _kernels.cuda_dequantize_nested(
        dev,
        codes.data_ptr(),
        nb,
        nested_absmax.data_ptr(),
        float(offset),
        nested_map.data_ptr(),
        out.data_ptr(),
        current_stream(codes.device),
    )
    return out


def _absmax_args(
    absmax: torch.Tensor | None, nested: NestedAbsmax | None
) -> tuple[int, int, int, float, int]:
    """Pointers (absmax, codes, nested_absmax, offset, nested_map) of a checked absmax or nested record."""
    if nested is None:
        return absmax.data_ptr(), 0, 0, 0.0, 0
    codes, nested_absmax, offset, nested_map = nested
    return 0, codes.data_ptr(), nested_absmax.data_ptr(), float(offset), nested_map.data_ptr()


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor | None,
    *,
    n: int,
    blocksize: int,
    quant_map: torch.Tensor,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
    nested: NestedAbsmax | tuple | None = None,
) -> torch.Tensor:
    """``[n]`` of out_dtype: ``quant_map[q] * absmax`` in float32, then a round-to-nearest-even cast.

    Pass either ``absmax`` or ``nested=(codes, nested_absmax, offset, nested_map)``: the nested absmax
    is decoded inline (same bits as ``dequantize_nested`` first). Arguments are checked as by
    ``converter.kernels.bnb4bit.dequantize_4bit`` (same messages), all on one CUDA device.
    """
    nested = check_dequantize_args(
        packed,
        absmax,
        n=n,
        blocksize=blocksize,
        quant_map=quant_map,
        out_dtype=out_dtype,
        out=out,
        nested=nested,
    )
    return _launch_dequantize_4bit(packed, absmax, n, blocksize, quant_map, out_dtype, out, nested)


def _launch_dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor | None,
    n: int,
    blocksize: int,
    quant_map: torch.Tensor,
    out_dtype: torch.dtype,
    out: torch.Tensor | None,
    nested: NestedAbsmax | None = None,
) -> torch.Tensor:
    """``dequantize_4bit`` on arguments ``converter.check_dequantize_args`` accepted."""
    dev = _require(packed, "packed")
    am, nc, na, off, m8 = _absmax_args(absmax, nested)
    if out is None:
        out = torch.empty(n, dtype=out_dtype, device=packed.device)
    _kernels.cuda_dequantize_4bit(
        dev,
        packed.data_ptr(),
        n,
        blocksize,
        am,
        nc,
        na,
        off,
        m8,
        quant_map.data_ptr(),
        KERNEL_DTYPE_CODES[out_dtype],
        out.data_ptr(),
        current_stream(packed.device),
    )
    return out


def gemv_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor | None = None,
    *,
    out_features: int,
    in_features: int,
    blocksize: int,
    quant_map: torch.Tensor,
    nested: NestedAbsmax | tuple | None = None,
    variant: int = 0,
) -> torch.Tensor:
    """``y [B, out_features]`` (``[out_features]`` for 1-D x) of x's dtype; float32 accumulation.

    Each weight is decoded as ``dequantize_4bit`` does; B = 1..8 rows of x; absmax nested inline.
    Arguments are checked as by ``converter.kernels.bnb4bit.gemv_4bit`` (same messages), all on one CUDA
    device. ``variant`` forces one kernel configuration of csrc/cuda/gemv.cu (benchmarks only; 0 =
    the ``QM_CUDA_GEMV`` choice, see ``GEMV_KERNELS``).
    """
    _, nested = check_gemv_args(
        x,
        packed,
        absmax,
        out_features=out_features,
        in_features=in_features,
        blocksize=blocksize,
        quant_map=quant_map,
        nested=nested,
    )
    return _launch_gemv_4bit(
        x, packed, absmax, out_features, in_features, blocksize, quant_map, nested, variant=variant
    )


def _launch_gemv_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor | None,
    out_features: int,
    in_features: int,
    blocksize: int,
    quant_map: torch.Tensor,
    nested: NestedAbsmax | None,
    *,
    variant: int = 0,
) -> torch.Tensor:
    """``gemv_4bit`` on arguments ``converter.check_gemv_args`` accepted."""
    dev = _require(x, "x")
    x2 = x.reshape(1, -1) if x.dim() == 1 else x
    batch = x2.shape[0]
    am, nc, na, off, m8 = _absmax_args(absmax, nested)
    y = torch.empty((batch, out_features), dtype=x.dtype, device=x.device)
    variant = variant or GEMV_DEFAULT_VARIANT
    dtype = KERNEL_DTYPE_CODES[x.dtype]
    n_scratch = _gemv_scratch(dev, dtype, batch, out_features, in_features, blocksize, variant)
    # K-slice partial sums of the stream kernel (thin shapes); inside a graph, from its memory pool
    scratch = torch.empty(n_scratch, dtype=torch.float32, device=x.device) if n_scratch else None
    _kernels.cuda_gemv_4bit(
        dev,
        x2.data_ptr(),
        dtype,
        batch,
        out_features,
        in_features,
        blocksize,
        packed.data_ptr(),
        am,
        nc,
        na,
        off,
        m8,
        quant_map.data_ptr(),
        y.data_ptr(),
        current_stream(x.device),
        variant,
        0 if scratch is None else scratch.data_ptr(),
    )
    return y if x.dim() == 2 else y[0]


class GemvWeight(NamedTuple):
    """One weight of a several-weights GEMV launch (arguments ``converter.check_gemv_args`` accepted)."""

    packed: torch.Tensor
    absmax: torch.Tensor | None
    nested: NestedAbsmax | None
    quant_map: torch.Tensor
    out_features: int


def _launch_gemv_4bit_multi(
    x: torch.Tensor,
    weights: Sequence[GemvWeight],
    in_features: int,
    blocksize: int,
    *,
    variant: int = 0,
) -> list[torch.Tensor]:
    """``[y_i [B, out_features_i]]`` = x @ W_i.T for 1..4 weights of the same x, in_features and blocksize:
    one launch of the stream kernel where it takes them all (csrc/cuda/gemv_stream.cu), else one
    launch per weight. x is [B, K] (B = 1..8)."""
    dev = _require(x, "x")
    batch = x.shape[0]
    ys = [torch.empty((batch, w.out_features), dtype=x.dtype, device=x.device) for w in weights]
    variant = variant or GEMV_DEFAULT_VARIANT
    dtype = KERNEL_DTYPE_CODES[x.dtype]
    rows = sum(w.out_features for w in weights)
    n_scratch = _gemv_multi_scratch(dev, dtype, batch, rows, in_features, blocksize, variant)
    # every weight's K-slice partial sums (thin shapes); inside a graph, from its memory pool
    scratch = torch.empty(n_scratch, dtype=torch.float32, device=x.device) if n_scratch else None
    ptrs = [_absmax_args(w.absmax, w.nested) for w in weights]
    _kernels.cuda_gemv_4bit_multi(
        dev,
        x.data_ptr(),
        dtype,
        batch,
        in_features,
        blocksize,
        [w.out_features for w in weights],
        [w.packed.data_ptr() for w in weights],
        [p[0] for p in ptrs],
        [p[1] for p in ptrs],
        [p[2] for p in ptrs],
        [p[3] for p in ptrs],
        [p[4] for p in ptrs],
        [w.quant_map.data_ptr() for w in weights],
        [y.data_ptr() for y in ys],
        current_stream(x.device),
        variant,
        0 if scratch is None else scratch.data_ptr(),
    )
    return ys


@cache
def _gemv_multi_scratch(
    device: int, dtype: int, batch: int, rows: int, k: int, blocksize: int, variant: int
) -> int:
    """float32 scratch elements a several-weights launch of ``rows`` rows in all needs; 0 for most."""
    if variant == 0 or 11 <= variant <= 18:  # only the stream kernel (chosen or forced) uses scratch
        return _kernels.cuda_gemv_4bit_multi_scratch(device, dtype, batch, rows, k, blocksize, variant)
    return 0


@cache
def _gemv_scratch(device: int, dtype: int, batch: int, n: int, k: int, blocksize: int, variant: int) -> int:
    """float32 scratch elements a GEMV launch needs (csrc/cuda: gemv_4bit_scratch); 0 for most."""
    if variant == 0 or 11 <= variant <= 18:  # only the stream kernel (chosen or forced) uses scratch
        return _kernels.cuda_gemv_4bit_scratch(device, dtype, batch, n, k, blocksize, variant)
    return 0
