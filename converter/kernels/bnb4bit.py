"""The Python face of the quantization kernels: documented, validated, dispatched by device.

CPU tensors run the C++ extension ``converter._kernels`` (threads + SIMD chosen at run time, each path
byte-identical to its scalar reference). CUDA tensors run ``converter.kernels.bnb4bit_cuda`` (the CUDA
backend,
imported only when a CUDA tensor arrives) with the same arguments minus ``isa`` / ``threads``.
The exactness rules are design.md's; ``formats.reference`` states them in numpy.

Layout shared by every function (bitsandbytes' serialized ``Linear4bit`` layout):

- ``n``: element count of the original weight, flattened in C order; blocks run over the flat tensor.
- ``packed``: ``torch.uint8 [(n + 1) // 2]``, two 4-bit codes per byte, the FIRST element in the HIGH
  nibble, an odd tail padded with the code of 0.0 (NF4 7, FP4 0).
- ``absmax``: ``torch.float32 [ceil(n / blocksize)]``, the unclamped max|x| of each block.
- nested absmax: ``codes torch.uint8 [nb]``, ``nested_absmax torch.float32 [ceil(nb / 256)]``, an
  ``offset`` (a float32 value as a Python float) and the 256-entry ``nested_map``.

Sizes are not limited to 2**31 here; the converter refuses bnb-incompatible sizes itself.
"""

from __future__ import annotations

import importlib
import math
from functools import cache
from types import ModuleType

import torch

from converter import _kernels
from converter.kernels.bnb4bit_np import default_threads as _default_threads
from converter.kernels.bnb4bit_np import threads_arg as _threads  # the numpy twin's check, shared
from converter.kernels.checks import (
    FLOAT_DTYPES,
    GEMV_MAX_BATCH,
    KERNEL_DTYPE_NAMES,
    NestedAbsmax,
    NonFiniteInputError,
    check_dequantize_args,
    check_dequantize_nested_args,
    check_gemv_args,
)
from converter.kernels.checks import check_tensor as _check_tensor
from formats.quant_types import (
    QuantType,
    check_blocksize,
    n_blocks,
    n_nested_blocks,
)

__all__ = [
    "FLOAT_DTYPES",
    "GEMV_MAX_BATCH",
    "NestedAbsmax",
    "NonFiniteInputError",
    "available_backends",
    "check_dequantize_args",
    "check_dequantize_nested_args",
    "check_gemv_args",
    "cpu_isas",
    "dequantize_4bit",
    "dequantize_nested",
    "gemv_4bit",
    "quantize_4bit",
    "quantize_nested",
]

_ISAS = ("auto", "scalar", "avx2", "avx512", "avx512bf16")


# ---------------------------------------------------------------------------------------------------
# Backends


def cpu_isas() -> list[str]:
    """Kernel paths this CPU can run, best last: a subset of ``["scalar", "avx2", "avx512", "avx512bf16"]``
    (avx512bf16: the AVX-512 path plus a vdpbf16ps GEMV for bfloat16 x)."""
    return list(_kernels.cpu_isas())


def available_backends() -> dict[str, dict]:
    """``{"cpu": {"isa": [...], "threads": int}, "cuda": {...}}``; "cuda" only when it is usable.

    The "cuda" entry is ``converter.kernels.bnb4bit_cuda.backend_info()`` (device names, build); a build
    without CUDA, or a machine without a usable driver / device, has no "cuda" key.
    """
    backends: dict[str, dict] = {"cpu": {"isa": cpu_isas(), "threads": _default_threads()}}
    if _kernels.has_cuda_build():
        info = _cuda_module().backend_info()
        if info is not None:
            backends["cuda"] = info
    return backends


@cache
def _cuda_module() -> ModuleType:
    if not _kernels.has_cuda_build():
        msg = (
            "this build of quantize-model has no CUDA backend: reinstall it on a machine with nvcc "
            "(QM_CUDA=ON pip install .) or pass CPU tensors"
        )
        raise RuntimeError(msg)
    return importlib.import_module("converter.kernels.bnb4bit_cuda")


# ---------------------------------------------------------------------------------------------------
# Validation helpers (each message names the argument and says what to do)


def _check_cpu(name: str, t: torch.Tensor) -> None:
    if t.device.type != "cpu":
        msg = f"{name} is on {t.device}: only CPU and CUDA tensors are supported"
        raise ValueError(msg)


def _isa(isa: str) -> str:
    if isa not in _ISAS:
        msg = f"unknown isa {isa!r}: expected one of {', '.join(map(repr, _ISAS))}"
        raise ValueError(msg)
    return isa


def _quant_type(quant_type: QuantType) -> QuantType:
    if not isinstance(quant_type, QuantType):
        msg = f"quant_type must be a formats.quant_types.QuantType, got {quant_type!r} (use QuantType.parse)"
        raise TypeError(msg)
    return quant_type


# ---------------------------------------------------------------------------------------------------
# Kernels


def quantize_4bit(
    x: torch.Tensor,
    *,
    blocksize: int,
    quant_type: QuantType,
    isa: str = "auto",
    threads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 4-bit quantization of ``x`` (any shape, flattened in C order).

    Args:
        x: ``float32 | float16 | bfloat16``, contiguous, CPU or CUDA; n = x.numel().
        blocksize: one of ``formats.quant_types.BLOCKSIZES`` (32..4096).
        quant_type: ``QuantType.NF4`` or ``QuantType.FP4``.
        isa: CPU path, ``"auto"`` (best this CPU runs), ``"scalar"`` (the reference), ``"avx2"``,
            ``"avx512"`` or ``"avx512bf16"``; every path gives the same bytes. Ignored on CUDA.
        threads: CPU threads (None: one per CPU of the affinity mask). Never changes the result.

    Returns:
        ``(packed uint8 [(n+1)//2], absmax float32 [ceil(n/blocksize)])`` on x's device.

    Raises:
        NonFiniteInputError: x holds NaN or Inf.
    """
    _check_tensor("x", x, FLOAT_DTYPES)
    check_blocksize(blocksize)
    quant_type = _quant_type(quant_type)
    _isa(isa)
    n = x.numel()
    if x.is_cuda:
        return _cuda_module().quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    _check_cpu("x", x)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(n_blocks(n, blocksize), dtype=torch.float32)
    bad_blocks = _kernels.quantize_4bit(
        x.data_ptr(),
        KERNEL_DTYPE_NAMES[x.dtype],
        n,
        blocksize,
        int(quant_type),
        packed.data_ptr(),
        absmax.data_ptr(),
        isa,
        _threads(threads),
    )
    if bad_blocks:
        raise NonFiniteInputError.in_blocks(bad_blocks, absmax.numel(), blocksize)
    return packed, absmax


def quantize_nested(
    absmax: torch.Tensor, *, isa: str = "auto", threads: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Nested (double) quantization of the absmax constants: blocksize 256, bnb's signed dynamic map.

    offset = float32(S / nb), S the float64 sum of absmax (sequential within chunks of 1024, then over
    the chunk sums); v = (absmax - offset) * (1 / max(nested_absmax, 1e-38)); code = number of the 255
    ``DYNAMIC8_MIDPOINTS`` strictly below v.

    Args:
        absmax: ``float32 [nb]``, contiguous, finite (the output of ``quantize_4bit``).
        isa: CPU path (``"scalar"`` is the reference); every path gives the same bytes.
        threads: CPU threads (None: one per CPU). Never changes the result.

    Returns:
        ``(codes uint8 [nb], nested_absmax float32 [ceil(nb/256)], offset)``; offset is a float32 value.
    """
    _check_tensor("absmax", absmax, (torch.float32,))
    _isa(isa)
    if absmax.is_cuda:
        return _cuda_module().quantize_nested(absmax)
    _check_cpu("absmax", absmax)
    nb = absmax.numel()
    codes = torch.empty(nb, dtype=torch.uint8)
    nested_absmax = torch.empty(n_nested_blocks(nb), dtype=torch.float32)
    offset = _kernels.quantize_nested(
        absmax.data_ptr(), nb, codes.data_ptr(), nested_absmax.data_ptr(), isa, _threads(threads)
    )
    if math.isnan(offset):  # the kernel's signal for a NaN or Inf absmax (a torch check costs more)
        raise NonFiniteInputError.in_absmax()
    return codes, nested_absmax, float(offset)


def dequantize_nested(
    codes: torch.Tensor,
    nested_absmax: torch.Tensor,
    offset: float,
    nested_map: torch.Tensor,
    *,
    threads: int | None = None,
) -> torch.Tensor:
    """absmax[i] = nested_map[codes[i]] * nested_absmax[i // 256], then + offset (separate f32 ops).

    Args:
        codes: ``uint8 [nb]``.
        nested_absmax: ``float32 [ceil(nb/256)]``.
        offset: the stored offset (a float32 value; a Python float is rounded to float32).
        nested_map: ``float32 [256]``, the map stored with the tensor (never a hard-coded one: bnb <= 0.49
            CPU checkpoints store -1.0 at index 0).

    Returns:
        ``absmax float32 [nb]`` on codes' device.
    """
    check_dequantize_nested_args(codes, nested_absmax, nested_map)
    if codes.is_cuda:
        return _cuda_module()._launch_dequantize_nested(codes, nested_absmax, offset, nested_map)
    _check_cpu("codes", codes)
    nb = codes.numel()
    out = torch.empty(nb, dtype=torch.float32)
    _kernels.dequantize_nested(
        codes.data_ptr(),
        nb,
        nested_absmax.data_ptr(),
        float(offset),
        nested_map.data_ptr(),
        out.data_ptr(),
        _threads(threads),
    )
    return out


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    *,
    n: int,
    blocksize: int,
    quant_map: torch.Tensor,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
    isa: str = "auto",
    threads: int | None = None,
) -> torch.Tensor:
    """w[k] = quant_map[q[k]] * absmax[k // blocksize] in float32, then a round-to-nearest-even cast.

    Args:
        packed: ``uint8 [(n+1)//2]`` (any shape with that many elements, e.g. bnb's ``[(n+1)//2, 1]``).
        absmax: ``float32 [ceil(n/blocksize)]``, already un-nested (see ``dequantize_nested``).
        n: element count of the original tensor.
        blocksize: one of ``formats.quant_types.BLOCKSIZES``.
        quant_map: ``float32 [16]``, the table stored with the tensor.
        out_dtype: ``float32 | float16 | bfloat16``.
        out: optional contiguous ``out_dtype`` tensor with n elements to write into (it is returned).
        isa, threads: as in ``quantize_4bit`` (CPU only; never change the result).

    Returns:
        A flat ``[n]`` tensor of out_dtype (or ``out``); reshape it to the weight's shape.
    """
    check_dequantize_args(
        packed, absmax, n=n, blocksize=blocksize, quant_map=quant_map, out_dtype=out_dtype, out=out
    )
    _isa(isa)
    if packed.is_cuda:
        return _cuda_module()._launch_dequantize_4bit(packed, absmax, n, blocksize, quant_map, out_dtype, out)
    _check_cpu("packed", packed)
    if out is None:
        out = torch.empty(n, dtype=out_dtype)
    _kernels.dequantize_4bit(
        packed.data_ptr(),
        absmax.data_ptr(),
        n,
        blocksize,
        quant_map.data_ptr(),
        out.data_ptr(),
        KERNEL_DTYPE_NAMES[out_dtype],
        isa,
        _threads(threads),
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
    isa: str = "auto",
    threads: int | None = None,
) -> torch.Tensor:
    """Fused 4-bit GEMV / small-batch GEMM: ``y[b, o] = sum_k x[b, k] * W[o, k]`` (no bias).

    W is the ``[out_features, in_features]`` weight quantized by ``quantize_4bit`` (flattened blocks).
    Accumulates in float32 (not a byte-exact path: it sums each block before scaling by its absmax).

    Args:
        x: ``float32 | float16 | bfloat16 [B, in_features]`` (B = 1..8) or ``[in_features]``, contiguous.
        packed: ``uint8 [out_features * in_features // 2]``.
        absmax: ``float32 [out_features * in_features // blocksize]``; None when ``nested`` is given.
        out_features, in_features: the weight's shape. ``in_features`` must be a multiple of
            ``blocksize`` (a block never crosses a row); otherwise this raises ValueError and the
            caller falls back to ``dequantize_4bit`` + ``F.linear``.
        blocksize: one of ``formats.quant_types.BLOCKSIZES``.
        quant_map: ``float32 [16]``, the table stored with the weight.
        nested: ``NestedAbsmax(codes, nested_absmax, offset, nested_map)`` when the absmax is nested;
            it is decoded inline exactly as ``dequantize_nested`` does.
        isa, threads: CPU path and threads. The paths differ only in float32 summation order, except
            ``"avx512bf16"`` (``"auto"`` where the CPU has AVX512_BF16) with bfloat16 x and
            blocksize >= 64: code values rounded to bfloat16, products summed by vdpbf16ps; and
            ``"avx2"`` (``"auto"`` on a CPU with AVX2 but not AVX-512) with float16 / bfloat16 x and
            blocksize >= 64: code values and x (scaled per 64 elements) as 15-bit integers, exact
            integer sums per 64 weights (docs/python-api.md says how far from the f32 product).

    Returns:
        ``y`` of x's dtype, ``[B, out_features]`` (``[out_features]`` for a 1-D x).
    """
    batch, nested = check_gemv_args(
        x,
        packed,
        absmax,
        out_features=out_features,
        in_features=in_features,
        blocksize=blocksize,
        quant_map=quant_map,
        nested=nested,
    )
    _isa(isa)
    if x.is_cuda:
        return _cuda_module()._launch_gemv_4bit(
            x, packed, absmax, out_features, in_features, blocksize, quant_map, nested, variant=0
        )
    _check_cpu("x", x)
    y = launch_gemv_4bit_cpu(
        x,
        packed,
        absmax,
        nested,
        quant_map,
        batch=batch,
        out_features=out_features,
        in_features=in_features,
        blocksize=blocksize,
        isa=isa,
        threads=_threads(threads),
    )
    return y if x.dim() == 2 else y[0]


def launch_gemv_4bit_cpu(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor | None,
    nested: NestedAbsmax | None,
    quant_map: torch.Tensor,
    *,
    batch: int,
    out_features: int,
    in_features: int,
    blocksize: int,
    isa: str,
    threads: int,
) -> torch.Tensor:
    """The C++ GEMV on checked, contiguous CPU tensors, ``batch`` rows of x: ``y [batch, out_features]``.

    Used by ``gemv_4bit`` above, which checks its arguments on every call (the
    ``quantize_model::gemv_4bit`` custom op calls the extension itself: custom_ops._gemv_4bit_cpu).
    """
    y = torch.empty((batch, out_features), dtype=x.dtype)
    _kernels.gemv_4bit(
        x.data_ptr(),
        KERNEL_DTYPE_NAMES[x.dtype],
        batch,
        in_features,
        out_features,
        blocksize,
        packed.data_ptr(),
        quant_map.data_ptr(),
        0 if absmax is None else absmax.data_ptr(),
        0 if nested is None else nested.codes.data_ptr(),
        0 if nested is None else nested.nested_absmax.data_ptr(),
        0.0 if nested is None else float(nested.offset),
        0 if nested is None else nested.nested_map.data_ptr(),
        y.data_ptr(),
        isa,
        threads,
    )
    return y
