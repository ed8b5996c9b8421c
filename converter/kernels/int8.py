"""The Python face of the LLM.int8 (bitsandbytes 8-bit) kernels: documented, validated, dispatched.

CPU tensors run the C++ extension (``csrc/int8_cpu.cpp``: threads + SIMD chosen at run time, every
path byte-identical to its scalar reference); CUDA tensors run ``converter.kernels.bnb4bit_cuda``'s int8
functions when the extension was built with CUDA. ``formats.int8`` states the same rules in numpy.

Layout (bitsandbytes' serialized ``Linear8bitLt``, ``weight_format`` 0 = row-major):

- ``codes``: ``torch.int8 [rows, cols]`` (rows = out_features), values in [-127, 127];
- ``scb``: ``torch.float32 [rows]``, the row absmax of the fp16-cast weight (``SCB``).

``scale="cpu"`` (default) is bitsandbytes' CPU scale ``f32(f32(1/SCB) * 127)``, which every device
here computes; ``scale="cuda"`` reproduces checkpoints that bitsandbytes made on a GPU
(``__fdividef(127, SCB)``, 1 ulp apart for 3,996 of the 31,745 fp16 absmax values: ``formats.int8``).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch

from converter import _kernels
from converter.kernels import int8_np
from converter.kernels.bnb4bit import (
    FLOAT_DTYPES,
    NonFiniteInputError,
    _check_cpu,
    _check_tensor,
    _cuda_module,
    _isa,
    _threads,
)
from converter.kernels.checks import KERNEL_DTYPE_NAMES
from converter.kernels.checks import check_same_device as _check_same_device

__all__ = ["GEMV_INT8_MAX_BATCH", "SCALES", "dequantize_int8", "gemv_int8", "quantize_int8", "scale_table"]

#: Largest batch of the fused int8 GEMV; larger batches dequantize and use F.linear.
GEMV_INT8_MAX_BATCH = int(_kernels.gemv_int8_max_batch)
#: The row scales a checkpoint can be made with (see the module docstring).
SCALES = int8_np.SCALES


def _cuda_int8() -> Any:
    """converter.kernels.int8_cuda (imported when a CUDA tensor arrives; needs a CUDA build)."""
    _cuda_module()  # raises with the reinstall hint on a CPU-only build
    from converter.kernels import int8_cuda as kernels_int8_cuda

    return kernels_int8_cuda


@cache
def scale_table(scale: str) -> torch.Tensor | None:
    """float32 [0x7c01] row scales indexed by the fp16 bits of SCB, or None for bnb's CPU formula
    (``converter.kernels.int8_np.scale_table`` as a tensor)."""
    table = int8_np.scale_table(scale)
    return None if table is None else torch.from_numpy(table.copy())


def _check_2d(name: str, t: torch.Tensor) -> tuple[int, int]:
    if t.dim() != 2:
        msg = f"{name} has shape {tuple(t.shape)}: expected a 2-D [out_features, in_features] weight"
        raise ValueError(msg)
    return int(t.shape[0]), int(t.shape[1])


def quantize_int8(
    x: torch.Tensor,
    *,
    scale: str = "cpu",
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    isa: str = "auto",
    threads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise int8 quantization of a 2-D weight, byte-identical to bitsandbytes' ``int8_vectorwise_quant``.

    Per row: ``h = fp16(x)`` (round to nearest even), ``SCB = max|h|``, ``q = round_half_even(h * s)``
    with ``s`` the row scale (``scale``); a NaN product gives 0, so a zero row and a row holding a
    value past fp16's range (SCB = +inf) store all-zero codes, as bitsandbytes does.

    Args:
        x: ``float32 | float16 | bfloat16 [rows, cols]``, contiguous, CPU or CUDA.
        scale: ``"cpu"`` (bnb's CPU scale, the default) or ``"cuda"`` (bnb's GPU ``__fdividef`` scale).
        out: optional ``(codes int8 [rows, cols], scb float32 [rows])`` to write into, contiguous, on x's
            device (they are returned). Fresh outputs are asked to be backed by huge pages
            (``madvise``), so reusing buffers saves little; it avoids the allocation altogether.
        isa: CPU path (``"scalar"`` is the reference); every path gives the same bytes. Ignored on CUDA.
        threads: CPU threads (None: one per CPU of the affinity mask). Never changes the result.

    Returns:
        ``(codes int8 [rows, cols], scb float32 [rows])`` on x's device.

    Raises:
        NonFiniteInputError: x holds NaN or Inf.
    """
    _check_tensor("x", x, FLOAT_DTYPES)
    rows, cols = _check_2d("x", x)
    _isa(isa)
    table = scale_table(scale)
    if out is not None:
        _check_tensor("out codes", out[0], (torch.int8,), rows * cols)
        _check_tensor("out scb", out[1], (torch.float32,), rows)
        _check_same_device(x, codes=out[0], scb=out[1])
    if x.is_cuda:
        return _cuda_int8().quantize_int8(x, scale=scale, out=out)
    _check_cpu("x", x)
    codes, scb = out if out is not None else (torch.empty((rows, cols), dtype=torch.int8), torch.empty(rows))
    codes = codes.view(rows, cols)
    bad_rows = _kernels.quantize_int8(
        x.data_ptr(),
        KERNEL_DTYPE_NAMES[x.dtype],
        rows,
        cols,
        codes.data_ptr(),
        scb.data_ptr(),
        0 if table is None else table.data_ptr(),
        isa,
        _threads(threads),
    )
    if bad_rows:
        msg = f"input contains NaN or Inf (in {bad_rows} of {rows} rows)"
        raise NonFiniteInputError(msg)
    return codes, scb


def check_dequantize_int8_args(
    codes: torch.Tensor, scb: torch.Tensor, out_dtype: torch.dtype
) -> tuple[int, int]:
    """``dequantize_int8``'s checks (every device); returns (rows, cols)."""
    _check_tensor("codes", codes, (torch.int8,))
    rows, cols = _check_2d("codes", codes)
    _check_tensor("scb", scb, (torch.float32,), rows)
    _check_same_device(codes, scb=scb)
    if out_dtype not in FLOAT_DTYPES:
        msg = f"out_dtype {out_dtype} is not supported: expected float32, float16 or bfloat16"
        raise ValueError(msg)
    return rows, cols


def dequantize_int8(
    codes: torch.Tensor,
    scb: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.float32,
    isa: str = "auto",
    threads: int | None = None,
) -> torch.Tensor:
    """``W = f32(f32(codes * SCB[row]) * f32(1/127))`` cast to ``out_dtype`` (round to nearest even).

    The bits of bitsandbytes' ``int8_vectorwise_dequant`` followed by ``.to(out_dtype)`` (an SCB of
    +inf gives NaN rows, as there).

    Args:
        codes: ``int8 [rows, cols]``, contiguous.
        scb: ``float32 [rows]``.
        out_dtype: ``float32 | float16 | bfloat16``.
        isa, threads: CPU path and threads; never change the result.
    """
    rows, cols = check_dequantize_int8_args(codes, scb, out_dtype)
    _isa(isa)
    if codes.is_cuda:
        return _cuda_int8().dequantize_int8(codes, scb, out_dtype=out_dtype)
    _check_cpu("codes", codes)
    out = torch.empty((rows, cols), dtype=out_dtype)
    _kernels.dequantize_int8(
        codes.data_ptr(),
        scb.data_ptr(),
        rows,
        cols,
        out.data_ptr(),
        KERNEL_DTYPE_NAMES[out_dtype],
        isa,
        _threads(threads),
    )
    return out


def gemv_int8(
    x: torch.Tensor,
    codes: torch.Tensor,
    scb: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    isa: str = "auto",
    threads: int | None = None,
) -> torch.Tensor:
    """Fused int8 GEMV / small-batch GEMM: ``y[b, o] = sum_k x[b, k] * codes[o, k] * SCB[o] / 127 (+ b[o])``.

    Accumulates ``x * q`` in float32 and scales each row sum once by ``f32(SCB * f32(1/127))``, then
    rounds to x's dtype: not byte-exact against dequantize + ``F.linear`` (different rounding order),
    within float32 accumulation error of it. A bias is added afterwards as ``y + bias`` (x's dtype;
    the CUDA kernel fuses that add with the same bits). CPU (csrc/int8_cpu.cpp) and CUDA
    (csrc/cuda/gemv_int8.cu, current stream, no host synchronisation) compute the same formula.

    Args:
        x: ``float32 | float16 | bfloat16 [B, in_features]`` (B = 1..8) or ``[in_features]``, contiguous.
        codes: ``int8 [out_features, in_features]``; scb: ``float32 [out_features]``.
        bias: optional ``[out_features]`` of x's dtype.
        isa, threads: CPU path and threads (ignored on CUDA).

    Returns:
        ``y`` of x's dtype, ``[B, out_features]`` (``[out_features]`` for a 1-D x).
    """
    _check_tensor("x", x, FLOAT_DTYPES)
    _check_tensor("codes", codes, (torch.int8,))
    out_features, in_features = _check_2d("codes", codes)
    _check_tensor("scb", scb, (torch.float32,), out_features)
    if bias is not None:
        _check_tensor("bias", bias, (x.dtype,), out_features)
    if x.dim() not in (1, 2) or x.shape[-1] != in_features:
        msg = f"x has shape {tuple(x.shape)}: expected [B, {in_features}] or [{in_features}]"
        raise ValueError(msg)
    batch = 1 if x.dim() == 1 else int(x.shape[0])
    if not 1 <= batch <= GEMV_INT8_MAX_BATCH:
        msg = (
            f"x has batch {batch}: the fused GEMV takes 1..{GEMV_INT8_MAX_BATCH}; "
            "use dequantize_int8 + F.linear"
        )
        raise ValueError(msg)
    _check_same_device(x, codes=codes, scb=scb, **({} if bias is None else {"bias": bias}))
    _isa(isa)
    if x.is_cuda:
        y = _cuda_int8().gemv_int8(x.reshape(batch, in_features), codes, scb, bias)
        return y if x.dim() == 2 else y[0]
    _check_cpu("x", x)
    y = torch.empty((batch, out_features), dtype=x.dtype)
    _kernels.gemv_int8(
        x.data_ptr(),
        KERNEL_DTYPE_NAMES[x.dtype],
        batch,
        in_features,
        out_features,
        codes.data_ptr(),
        scb.data_ptr(),
        y.data_ptr(),
        isa,
        _threads(threads),
    )
    if bias is not None:
        y = y + bias
    return y if x.dim() == 2 else y[0]
