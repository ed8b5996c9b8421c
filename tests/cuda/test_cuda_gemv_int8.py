"""The fused CUDA int8 GEMV (csrc/cuda/gemv_int8.cu) against a float64 reference and the CPU GEMV.

Skipped without a GPU. Bounds come from tests/error_bounds.py (derived, not fitted).
"""

from __future__ import annotations

import pytest
import torch
from error_bounds import U32, dot_bound, worst_ratio

from converter.kernels import int8 as kernels_int8
from formats.int8 import dequantize_int8

pytestmark = pytest.mark.cuda

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The kernel sums exact products x * q, then multiplies the sum by f32(SCB * f32(1/127)): two roundings.
# The reference weight f32(f32(q * SCB) * f32(1/127)) holds two other roundings. So against the
# reference weight, every term carries at most the relative error (1 + u)^2 / (1 - u)^2 - 1.
WEIGHT_REL = (1 + U32) ** 2 / (1 - U32) ** 2 - 1


def _layer(out_f: int, in_f: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    w[1] = 0.0  # SCB 0: all-zero codes, a zero output row
    codes, scb = kernels_int8.quantize_int8(w)
    w32 = torch.from_numpy(dequantize_int8(codes.numpy(), scb.numpy()))
    return codes, scb, w32


def _x(batch: int, in_f: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(batch, in_f, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("shape", [(300, 4096), (4103, 512), (37, 515)], ids=["wide", "tall", "generic"])
def test_gemv_within_bound_of_float64_and_of_the_cpu_gemv(dtype, batch, shape) -> None:
    out_f, in_f = shape
    codes, scb, w32 = _layer(out_f, in_f, seed=in_f + batch)
    x = _x(batch, in_f, dtype, seed=batch)
    bias = (torch.randn(out_f) * 0.1).to(dtype)
    for b in (None, bias):
        ref, bound = dot_bound(x, w32, out_dtype=dtype, bias=b, weight_rel=WEIGHT_REL)
        y = kernels_int8.gemv_int8(x.cuda(), codes.cuda(), scb.cuda(), None if b is None else b.cuda())
        assert y.dtype == dtype
        assert y.shape == (batch, out_f)
        assert worst_ratio(y.cpu(), ref, bound) <= 1.0
        # The CPU GEMV is within the same bound of the reference (its own test), so the two are
        # within twice the bound of each other.
        y_cpu = kernels_int8.gemv_int8(x, codes, scb, b)
        assert worst_ratio(y.cpu(), y_cpu.double(), 2 * bound) <= 1.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 4])
def test_fused_bias_has_the_bits_of_gemv_then_add(dtype, batch) -> None:
    """y + bias in x's dtype (the CPU path and torch's add): the fused epilogue changes no bit."""
    codes, scb, _ = _layer(256, 1024, seed=7)
    x = _x(batch, 1024, dtype, seed=3).cuda()
    bias = (torch.randn(256) * 0.3).to(dtype).cuda()
    codes, scb = codes.cuda(), scb.cuda()
    fused = kernels_int8.gemv_int8(x, codes, scb, bias)
    assert torch.equal(fused, kernels_int8.gemv_int8(x, codes, scb) + bias)


def test_unaligned_x_takes_the_generic_kernel_with_the_same_bound() -> None:
    codes, scb, w32 = _layer(64, 1024, seed=11)
    x = _x(2, 1024, torch.bfloat16, seed=5)
    buf = torch.empty(2 * 1024 + 1, dtype=torch.bfloat16, device="cuda")
    xd = buf[1:].view(2, 1024)  # 2 bytes past a 16-byte boundary: not the vector kernel
    xd.copy_(x)
    ref, bound = dot_bound(x, w32, out_dtype=torch.bfloat16, weight_rel=WEIGHT_REL)
    assert worst_ratio(kernels_int8.gemv_int8(xd, codes.cuda(), scb.cuda()).cpu(), ref, bound) <= 1.0


def test_overflow_row_is_nan_as_on_the_cpu_and_1d_x() -> None:
    w = torch.randn(16, 128) * 0.05
    w[3, 5] = 99840.0  # past fp16: SCB +inf, zero codes -> 0 * inf = NaN, as dequantize gives
    codes, scb = kernels_int8.quantize_int8(w)
    x = torch.randn(128)
    y = kernels_int8.gemv_int8(x.cuda(), codes.cuda(), scb.cuda()).cpu()
    assert y.shape == (16,)
    assert torch.equal(torch.isnan(y), torch.isnan(kernels_int8.gemv_int8(x, codes, scb)))
    assert bool(torch.isnan(y[3]))
    assert not bool(torch.isnan(y[torch.arange(16) != 3]).any())


def test_gemv_is_deterministic() -> None:
    codes, scb, _ = _layer(4096, 4096, seed=2)
    codes, scb = codes.cuda(), scb.cuda()
    x = _x(8, 4096, torch.bfloat16, seed=2).cuda()
    first = kernels_int8.gemv_int8(x, codes, scb)
    for _ in range(3):
        assert torch.equal(kernels_int8.gemv_int8(x, codes, scb), first)


def test_argument_errors_name_the_argument() -> None:
    codes, scb, _ = _layer(8, 64, seed=1)
    x = torch.randn(1, 64, device="cuda")
    with pytest.raises(ValueError, match="codes is on cpu"):
        kernels_int8.gemv_int8(x, codes, scb.cuda())
    bf16_bias = torch.zeros(8, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="bias has dtype"):
        kernels_int8.gemv_int8(x, codes.cuda(), scb.cuda(), bf16_bias)
    with pytest.raises(ValueError, match="batch 9"):
        kernels_int8.gemv_int8(torch.randn(9, 64, device="cuda"), codes.cuda(), scb.cuda())


@pytest.mark.parametrize("variant", [1, 2, 3, 4])
@pytest.mark.parametrize("batch", [1, 2])
def test_forced_configurations_give_the_same_bound(variant, batch) -> None:
    """The batch 1-2 configurations the benchmark compares (rows per warp, chunks in flight), on a
    row count that leaves a partial warp / CTA."""
    from converter.kernels import int8_cuda as kernels_int8_cuda

    codes, scb, w32 = _layer(1001, 4096, seed=variant)
    x = _x(batch, 4096, torch.bfloat16, seed=variant)
    ref, bound = dot_bound(x, w32, out_dtype=torch.bfloat16, weight_rel=WEIGHT_REL)
    y = kernels_int8_cuda.gemv_int8(x.cuda(), codes.cuda(), scb.cuda(), variant=variant)
    assert worst_ratio(y.cpu(), ref, bound) <= 1.0
