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

from converter.kernels import int8_np
from converter.record.quality import QualityMeter, TensorQuality


class Int8QualityMeter(QualityMeter):
    def __init__(self, threads: int | None) -> None:
        super().__init__(None, 0, threads)  # type: ignore[arg-type]  # no 4-bit type / blocksize

    def measured_result(self, name: str, result: Any) -> None:
        self.measured(name, result.codes, result.scb, None)

    def _measure(self, name: str, x: Any, dtype: str, codes: Any) -> None:
        t0 = time.perf_counter()
        # measured() wrapped (codes, scb) in a Codes
        self.tensors[name] = measure_int8(name, x, codes.packed, codes.absmax, dtype)
        self.seconds += time.perf_counter() - t0


#: Elements per chunk of rows measured at once: small enough for the core's cache, large enough that
#: the Python loop costs nothing next to the arithmetic.
_CHUNK = 1 << 16


def _float32(x: np.ndarray, dtype: str | None) -> np.ndarray:
    """``x`` widened to float32 (exact for bf16 / fp16; float64 rounded to nearest); bf16 arrives as
    its uint16 bits (``dtype`` "BF16")."""
    if dtype == "BF16":
        return (x.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float32, copy=False)


def _host(t: Any) -> tuple[np.ndarray, str | None]:
    """A numpy array (as given) or a CPU torch tensor as numpy, bf16 as its uint16 bits."""
    if isinstance(t, np.ndarray):
        return t, None
    t = t.detach().cpu().contiguous()
    if str(t.dtype) == "torch.bfloat16":
        import torch

        return t.view(torch.int16).numpy().view(np.uint16), "BF16"
    return t.numpy(), None


def measure_int8(name: str, x: Any, q: Any, scb: Any, dtype: str | None = None) -> TensorQuality:
    """Error statistics of int8 codes ``q`` with row scales ``scb`` against ``x``: numpy arrays (``x``
    holding ``dtype`` values, bf16 as uint16 bits with ``dtype`` "BF16") or torch tensors.

    numpy on the caller's thread, a chunk of rows at a time: torch's element-wise ops here ran on its
    OpenMP team, which the converter's background measuring thread then woke for every tensor beside
    the kernel pool and the writer (an int8 SmolLM2-135M conversion spent 13-34 s measuring on 2
    cores, 2-4 s with one OpenMP thread), and held several float64 copies of the whole tensor; and
    the converter's int8 path imports no torch."""
    xh, code = _host(x)
    dtype = code or dtype
    q = np.ascontiguousarray(_host(q)[0])
    scb = np.ascontiguousarray(_host(scb)[0])
    xt = xh.reshape(q.shape)
    rows = q.shape[0]
    step = max(1, _CHUNK // max(1, q.size // max(1, rows)))
    sum_x2 = sum_e2 = 0.0
    maxes: list[float] = []
    bad = 0
    for r0 in range(0, rows, step):
        xf = _float32(xt[r0 : r0 + step], dtype).reshape(-1)
        w = int8_np.dequantize_int8(q[r0 : r0 + step], scb[r0 : r0 + step], threads=1).reshape(-1)
        decoded = np.isfinite(w)
        err = np.where(decoded, xf - w, xf)
        bad += int(np.count_nonzero(~(np.isfinite(xf) & decoded)))  # NaN/Inf in x or dequantized(x)
        sum_x2 += float(np.square(xf, dtype=np.float64).sum())
        sum_e2 += float(np.square(err, dtype=np.float64).sum())
        if err.size:
            maxes.append(float(np.abs(err).max()))
    return TensorQuality(name, q.size, sum_x2, sum_e2, float(np.max(maxes)) if maxes else 0.0, bad)
