"""Quality statistics of LLM.int8 weights for quantization_report.json (the int8 twin of quality.py).

Same bookkeeping as ``converter.record.quality.QualityMeter`` (inputs remembered until their codes come
back, measured on one background thread); the error is ``x - W`` with ``W`` the dequantized weight
``f32(f32(q * SCB) * f32(1/127))`` the loaders compute. A row stored as SCB = inf (a value past
fp16's range) decodes to NaN in bitsandbytes; its error is counted as ``x`` itself (the whole row lost)
and its elements as non-finite (``nonfinite``: NaN/Inf in x or dequantized(x)).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from converter.kernels import int8 as kernels_int8
from converter.quantize.int8_quantizer import as_tensor
from converter.record.quality import QualityMeter, TensorQuality

_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class Int8QualityMeter(QualityMeter):
    def __init__(self, threads: int | None) -> None:
        super().__init__(None, 0, threads)  # type: ignore[arg-type]  # no 4-bit type / blocksize

    def measured_result(self, name: str, result: Any) -> None:
        self.measured(name, result.codes, result.scb, None)

    def _measure(self, name: str, x: Any, dtype: str, codes: Any) -> None:
        t0 = time.perf_counter()
        # measured() wrapped (codes, scb) in a Codes
        self.tensors[name] = measure_int8(name, as_tensor(x, dtype), codes.packed, codes.absmax)
        self.seconds += time.perf_counter() - t0


#: Elements per chunk of rows measured at once: small enough for the core's cache, large enough that
#: the Python loop costs nothing next to the arithmetic.
_CHUNK = 1 << 16


def _float32(x: torch.Tensor) -> np.ndarray:
    """``x`` widened to float32 as numpy (exact for bf16 / fp16; float64 rounded to nearest)."""
    if x.dtype == torch.bfloat16:
        bits = x.contiguous().view(torch.int16).numpy().view(np.uint16)
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return x.contiguous().numpy().astype(np.float32, copy=False)


def measure_int8(name: str, x: torch.Tensor, q: torch.Tensor, scb: torch.Tensor) -> TensorQuality:
    """Error statistics of int8 codes ``q`` with row scales ``scb`` against ``x`` (any float dtype).

    numpy on the caller's thread, a chunk of rows at a time: torch's element-wise ops here ran on its
    OpenMP team, which the converter's background measuring thread then woke for every tensor beside
    the kernel pool and the writer (an int8 SmolLM2-135M conversion spent 13-34 s measuring on 2
    cores, 2-4 s with one OpenMP thread), and held several float64 copies of the whole tensor."""
    q = q.contiguous()
    scb = scb.contiguous()
    xt = x.reshape(q.shape)
    rows = q.shape[0]
    step = max(1, _CHUNK // max(1, q.numel() // max(1, rows)))
    sum_x2 = sum_e2 = 0.0
    maxes: list[float] = []
    bad = 0
    for r0 in range(0, rows, step):
        xf = _float32(xt[r0 : r0 + step]).reshape(-1)
        w = kernels_int8.dequantize_int8(
            q[r0 : r0 + step], scb[r0 : r0 + step], out_dtype=torch.float32, threads=1
        )
        w = w.numpy().reshape(-1)
        decoded = np.isfinite(w)
        err = np.where(decoded, xf - w, xf)
        bad += int(np.count_nonzero(~(np.isfinite(xf) & decoded)))  # NaN/Inf in x or dequantized(x)
        sum_x2 += float(np.square(xf, dtype=np.float64).sum())
        sum_e2 += float(np.square(err, dtype=np.float64).sum())
        if err.size:
            maxes.append(float(np.abs(err).max()))
    return TensorQuality(name, q.numel(), sum_x2, sum_e2, float(np.max(maxes)) if maxes else 0.0, bad)
