"""The CPU LLM.int8 kernels on numpy arrays: the int8 converter's path, which never imports torch.

``converter.kernels.int8`` is the torch face of the same C++ entry points (``csrc/int8_cpu.cpp``); this
module hands them numpy buffers, as ``converter.kernels.bnb4bit_np`` does for 4-bit, so an int8
``quantize-model convert`` on the CPU starts without torch (its import was most of a small model's
conversion). Bytes are identical to ``converter.kernels.int8.quantize_int8``: same kernel, same arguments.

bfloat16 has no numpy dtype: a bf16 weight is passed as its uint16 bit pattern with ``dtype="BF16"``.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np

from converter import _kernels
from converter.errors import NonFiniteInputError
from converter.kernels.bnb4bit_np import address, check_input, threads_arg

__all__ = ["dequantize_int8", "error_stats", "host_array", "quantize_int8", "scale_table"]

#: The row scales a checkpoint can be made with (``converter.kernels.int8``'s module docstring).
SCALES = ("cpu", "cuda")


@cache
def scale_table(scale: str) -> np.ndarray | None:
    """float32 [0x7c01] row scales indexed by the fp16 bits of SCB, or None for bnb's CPU formula."""
    if scale not in SCALES:
        msg = f"unknown int8 scale {scale!r}: expected one of {', '.join(map(repr, SCALES))}"
        raise ValueError(msg)
    if scale == "cpu":
        return None
    from formats.int8 import cuda_scale_table

    table = np.ascontiguousarray(cuda_scale_table(), dtype=np.float32)
    assert table.size == _kernels.int8_scale_table_size
    return table


#: numpy dtype name -> safetensors code of the kernels' float inputs (bf16 travels as uint16 bits).
_CODES = {"float32": "F32", "float16": "F16"}


def host_array(t: Any) -> tuple[np.ndarray, str | None]:
    """``t`` (a numpy array, or a torch tensor from a Python caller) as a numpy array on the host and
    the safetensors code of its float dtype (None for any other dtype): a bf16 tensor as its uint16
    bits, "BF16" (no copy of a contiguous CPU tensor); torch is imported only for a torch tensor."""
    if isinstance(t, np.ndarray):
        return t, _CODES.get(t.dtype.name)
    t = t.detach().cpu().contiguous()
    if str(t.dtype) == "torch.bfloat16":
        import torch

        return t.view(torch.int16).numpy().view(np.uint16), "BF16"
    a = t.numpy()
    return a, _CODES.get(a.dtype.name)


def _rows_cols(x: np.ndarray) -> tuple[int, int]:
    if x.ndim != 2:
        msg = f"x has shape {tuple(x.shape)}: expected a 2-D [out_features, in_features] weight"
        raise ValueError(msg)
    return int(x.shape[0]), int(x.shape[1])


def quantize_int8(
    x: np.ndarray, dtype: str, *, scale: str = "cpu", threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise int8 quantization of a 2-D weight (bitsandbytes' ``int8_vectorwise_quant``); see
    ``converter.kernels.int8.quantize_int8``.

    Args:
        x: a C-contiguous ``[rows, cols]`` array holding ``dtype`` values (bf16 as uint16 bits); may be
            a read-only memory map.
        dtype: safetensors code of x: ``"F32"``, ``"F16"`` or ``"BF16"``.
        scale: ``"cpu"`` (bnb's CPU scale) or ``"cuda"`` (bnb's GPU scale).

    Returns:
        ``(codes int8 [rows, cols], scb float32 [rows])``.

    Raises:
        NonFiniteInputError: x holds NaN or Inf.
    """
    name = check_input(x, dtype)
    rows, cols = _rows_cols(x)
    table = scale_table(scale)
    codes = np.empty((rows, cols), dtype=np.int8)
    scb = np.empty(rows, dtype=np.float32)
    if rows == 0:
        return codes, scb
    bad_rows = _kernels.quantize_int8(
        address(x) if cols else 0,
        name,
        rows,
        cols,
        address(codes) if cols else 0,
        address(scb),
        0 if table is None else address(table),
        "auto",
        threads_arg(threads),
    )
    if bad_rows:
        msg = f"input contains NaN or Inf (in {bad_rows} of {rows} rows)"
        raise NonFiniteInputError(msg)
    return codes, scb


def dequantize_int8(codes: np.ndarray, scb: np.ndarray, *, threads: int | None = None) -> np.ndarray:
    """float32 ``[rows, cols]``: ``f32(f32(codes * SCB[row]) * f32(1/127))``, the weight bitsandbytes'
    loaders compute (a row with SCB = inf decodes to NaN, as there)."""
    rows, cols = _rows_cols(codes)
    codes = np.ascontiguousarray(codes, dtype=np.int8)
    scb = np.ascontiguousarray(scb, dtype=np.float32)
    if scb.shape != (rows,):
        msg = f"scb has shape {tuple(scb.shape)}: expected ({rows},) for codes of {(rows, cols)}"
        raise ValueError(msg)
    out = np.empty((rows, cols), dtype=np.float32)
    if out.size:
        _kernels.dequantize_int8(
            address(codes), address(scb), rows, cols, address(out), "float32", "auto", threads_arg(threads)
        )
    return out


def error_stats(
    x: np.ndarray, dtype: str, codes: np.ndarray, scb: np.ndarray, *, threads: int | None = None
) -> tuple[float, float, float, int]:
    """(sum x^2, sum e^2, max |e|, non-finite count) of ``codes``/``scb`` against ``x`` (``dtype`` values,
    bf16 as uint16 bits, reshaped to the codes' [rows, cols]) in one pass: ``e = x - W`` with ``W`` the
    weight bitsandbytes' loaders compute, or ``x`` where ``W`` is not finite (a row stored with SCB =
    inf); float64 sums per row, added in row order (any thread count gives the same result)."""
    rows, cols = _rows_cols(codes)
    x = np.ascontiguousarray(x)
    name = check_input(x, dtype)
    codes = np.ascontiguousarray(codes, dtype=np.int8)
    scb = np.ascontiguousarray(scb, dtype=np.float32)
    if x.size != codes.size or scb.shape != (rows,):
        msg = f"x of {x.size} elements and scb {tuple(scb.shape)} do not match codes of {(rows, cols)}"
        raise ValueError(msg)
    if codes.size == 0:
        return 0.0, 0.0, 0.0, 0
    sx, se, m, bad = _kernels.int8_error_stats(
        address(x), name, rows, cols, address(codes), address(scb), threads_arg(threads)
    )
    return float(sx), float(se), float(m), int(bad)
