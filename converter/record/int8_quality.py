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


def measure_int8(name: str, x: torch.Tensor, q: torch.Tensor, scb: torch.Tensor) -> TensorQuality:
    """Error statistics of int8 codes ``q`` with row scales ``scb`` against ``x`` (any float dtype)."""
    xf = x.reshape(q.shape).to(torch.float32)
    w = kernels_int8.dequantize_int8(q.contiguous(), scb.contiguous(), out_dtype=torch.float32, threads=1)
    decoded = torch.isfinite(w)
    err = torch.where(decoded, xf - w, xf)
    bad = int((~torch.isfinite(xf) | ~decoded).sum())  # NaN/Inf in x or dequantized(x), as for 4-bit
    return TensorQuality(
        name,
        xf.numel(),
        float(xf.double().square().sum()),
        float(err.double().square().sum()),
        float(err.abs().max()) if err.numel() else 0.0,
        bad,
    )
