"""CUDA int8 kernels vs the CPU ones: the same bytes (codes, SCB, dequantized weights) for both scales.

Skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from converter.kernels import bnb4bit as kernels
from converter.kernels import int8 as kernels_int8
from converter.quantize.int8_quantizer import Int8Quantizer

pytestmark = pytest.mark.cuda

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _weight(rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * 0.05
    x[1] = 0.0
    x[2] *= 1e-6
    if dtype != torch.float16:
        x[3, 5] = 99840.0  # past fp16: SCB inf, zero codes
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
# (4, 7): the element kernel; the others the vector kernel (cols % 8 == 0), 11008 and 8200 with
# groups past the 8192 columns a thread holds in registers (read twice).
@pytest.mark.parametrize("shape", [(4, 7), (37, 1000), (300, 4096), (6, 8200), (5, 11008)])
@pytest.mark.parametrize("scale", ["cpu", "cuda"])
def test_quantize_same_bytes_as_cpu(dtype, shape, scale) -> None:
    x = _weight(*shape, dtype, seed=shape[1])
    q, s = kernels_int8.quantize_int8(x, scale=scale)
    qd, sd = kernels_int8.quantize_int8(x.cuda(), scale=scale)
    assert torch.equal(qd.cpu(), q)
    assert torch.equal(sd.cpu().view(torch.int32), s.view(torch.int32))


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequantize_same_bits_as_cpu(out_dtype) -> None:
    q, s = kernels_int8.quantize_int8(_weight(64, 515, torch.bfloat16, seed=1))
    w = kernels_int8.dequantize_int8(q, s, out_dtype=out_dtype)
    wd = kernels_int8.dequantize_int8(q.cuda(), s.cuda(), out_dtype=out_dtype).cpu()
    nan = torch.isnan(w)
    assert torch.equal(torch.isnan(wd), nan)
    assert torch.equal(wd[~nan], w[~nan])


def test_nan_is_refused_and_quantizer_runs_on_the_gpu() -> None:
    x = torch.zeros(4, 16, device="cuda")
    x[1, 2] = float("nan")
    with pytest.raises(kernels.NonFiniteInputError):
        kernels_int8.quantize_int8(x)
    q = Int8Quantizer("cpu", device="cuda")
    assert q.fallback_reason == ""
    w = _weight(16, 64, torch.bfloat16, seed=3)
    ((_, r),) = q.quantize_many([("w", w)])
    assert torch.equal(torch.from_numpy(r.codes), kernels_int8.quantize_int8(w)[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_input_takes_the_element_kernel_with_the_same_bytes(dtype) -> None:
    x = _weight(8, 1024, dtype, seed=9)
    buf = torch.empty(x.numel() + 1, dtype=dtype, device="cuda")
    xd = buf[1:].view(8, 1024)  # one element past a 16-byte boundary: not the vector kernel
    xd.copy_(x)
    q, s = kernels_int8.quantize_int8(x)
    qd, sd = kernels_int8.quantize_int8(xd)
    assert torch.equal(qd.cpu(), q)
    assert torch.equal(sd.cpu().view(torch.int32), s.view(torch.int32))
