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


def measure_int8(name: str, x: Any, q: Any, scb: Any, dtype: str | None = None) -> TensorQuality:
    """Error statistics of int8 codes ``q`` with row scales ``scb`` against ``x``: numpy arrays (``x``
    holding ``dtype`` values, bf16 as uint16 bits with ``dtype`` "BF16") or torch tensors.

    One pass of the extension's ``int8_error_stats`` on the caller's thread (the converter's measuring
    thread): torch's element-wise ops here ran on its OpenMP team, which that background thread woke for
    every tensor beside the kernel pool and the writer (an int8 SmolLM2-135M conversion spent 13-34 s
    measuring on 2 cores), then numpy took ~0.8 s of CPU; and the converter's int8 path imports no torch."""
    xh, code = int8_np.host_array(x)
    if code is None and dtype == "BF16" and xh.dtype.itemsize == 2 and xh.dtype.kind in "ui":
        code = "BF16"  # the pipeline's bf16 bits
    if code is None:  # float64 from a Python caller: its float32 rounding (as it was measured before)
        xh, code = xh.astype(np.float32), "F32"
    q = np.ascontiguousarray(int8_np.host_array(q)[0])
    scb = np.ascontiguousarray(int8_np.host_array(scb)[0])
    sx, se, m, bad = int8_np.error_stats(xh.reshape(q.shape), code, q, scb, threads=1)
    return TensorQuality(name, q.size, sx, se, m, bad)
