"""The CUDA side of ``converter.kernels.int8`` (csrc/cuda/int8.cu): device pointers, current stream.

Called by ``converter.kernels.int8`` for CUDA tensors, after its argument checks. Same bytes as the
CPU kernels for the same ``scale`` ("cuda" uses the measured ``__fdividef`` table on every device).
"""

from __future__ import annotations

from functools import cache

import torch

from converter import _kernels
from converter.kernels.bnb4bit_cuda import _require
from converter.kernels.checks import KERNEL_DTYPE_CODES, NonFiniteInputError
from converter.kernels.cuda_launch import current_stream


def available() -> bool:
    """Whether this build has the int8 CUDA kernels (the device itself is checked per call)."""
    return hasattr(_kernels, "cuda_quantize_int8")


@cache
def _table(device: torch.device) -> torch.Tensor:
    # straight from formats (not converter.kernels.int8, which imports this module for CUDA tensors)
    from formats.int8 import cuda_scale_table

    table = torch.from_numpy(cuda_scale_table().copy())
    assert table.numel() == _kernels.int8_scale_table_size
    return table.to(device)


def quantize_int8(
    x: torch.Tensor, *, scale: str = "cpu", out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8 [rows, cols], scb float32 [rows])`` on x's device. Synchronises once (NaN/Inf check)."""
    dev = _require(x, "x")
    rows, cols = x.shape
    if out is None:
        codes = torch.empty((rows, cols), dtype=torch.int8, device=x.device)
        scb = torch.empty(rows, dtype=torch.float32, device=x.device)
    else:
        codes, scb = out[0].view(rows, cols), out[1]
    flag = torch.zeros(1, dtype=torch.int32, device=x.device)
    _launch_quantize_int8(dev, x, scale, codes, scb, flag)
    if int(flag.item()):
        msg = f"input contains NaN or Inf (a [{rows}, {cols}] weight)"
        raise NonFiniteInputError(msg)  # the CPU path's exception: one type to catch
    return codes, scb


def _launch_quantize_int8(
    dev: int, x: torch.Tensor, scale: str, codes: torch.Tensor, scb: torch.Tensor, flag: torch.Tensor | None
) -> None:
    """The kernel launch of ``quantize_int8`` alone (no sync; benchmarks time this): flag, if given,
    gets a non-zero value when x holds NaN or Inf."""
    rows, cols = x.shape
    table = _table(x.device).data_ptr() if scale == "cuda" else 0
    _kernels.cuda_quantize_int8(
        dev, x.data_ptr(), KERNEL_DTYPE_CODES[x.dtype], rows, cols, table, codes.data_ptr(), scb.data_ptr(),
        0 if flag is None else flag.data_ptr(), current_stream(x.device),
    )  # fmt: skip


def dequantize_int8(codes: torch.Tensor, scb: torch.Tensor, *, out_dtype: torch.dtype) -> torch.Tensor:
    """``cast((codes * scb[row]) * f32(1/127))`` on codes' device."""
    dev = _require(codes, "codes")
    rows, cols = codes.shape
    out = torch.empty((rows, cols), dtype=out_dtype, device=codes.device)
    _kernels.cuda_dequantize_int8(
        dev, codes.data_ptr(), scb.data_ptr(), rows, cols, KERNEL_DTYPE_CODES[out_dtype], out.data_ptr(),
        current_stream(codes.device),
    )  # fmt: skip
    return out


def has_gemv() -> bool:
    """Whether this build has the fused int8 GEMV (csrc/cuda/gemv_int8.cu)."""
    return hasattr(_kernels, "cuda_gemv_int8")


def gemv_int8(
    x: torch.Tensor,
    codes: torch.Tensor,
    scb: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    variant: int = 0,
) -> torch.Tensor:
    """``y [B, out] = T(x @ (codes * SCB / 127).T)``, then ``T(y + bias)``; float32 sums, B = 1..8.

    Arguments as ``converter.kernels.int8.gemv_int8`` checked them (x 2-D and contiguous, one device;
    bias ``[out]`` of x's dtype). Launched on the current stream, output allocated on x's device and
    no host synchronisation: safe to capture in a CUDA graph. ``variant`` 1..4 forces a batch 1-2
    kernel configuration of csrc/cuda/gemv_int8.cu (benchmarks only; 0 = default).
    """
    dev = _require(x, "x")
    batch, in_features = x.shape
    out_features = codes.shape[0]
    y = torch.empty((batch, out_features), dtype=x.dtype, device=x.device)
    _kernels.cuda_gemv_int8(
        dev, x.data_ptr(), KERNEL_DTYPE_CODES[x.dtype], batch, out_features, in_features, codes.data_ptr(),
        scb.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(), current_stream(x.device),
        variant,
    )  # fmt: skip
    return y
