"""LLM.int8 kernels: byte-identical to bitsandbytes' CPU ops on every ISA and thread count.

Oracles: ``torch.ops.bitsandbytes.int8_vectorwise_quant`` / ``int8_vectorwise_dequant`` (bnb 0.50.2's
default CPU kernels, fed the fp16 cast as ``Int8Params`` does), and ``formats.int8``'s numpy reference
for the CUDA-scale option (bnb runs its CUDA kernel only on a GPU).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from converter.kernels import bnb4bit as kernels
from converter.kernels import int8 as k8
from formats import int8

pytest.importorskip("bitsandbytes")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ISAS = kernels.cpu_isas()
# Row lengths around the SIMD widths (8, 16, 32) and their tails, plus a wide one.
SHAPES = [(1, 1), (3, 7), (5, 16), (9, 33), (64, 96), (130, 257), (17, 1000)]


def _edge_rows(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """N(0, 0.05) rows plus an all-zero row, a row of tiny values (fp16 subnormals after the cast),
    a row with one value on a .5 rounding tie, and (bf16/fp32) a row past fp16's range."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 0.05
    rows, cols = shape
    if rows > 3:
        x[1] = 0.0
        x[2] = x[2] * 1e-6
        x[3, 0] = 127.0  # SCB 127: scale exactly 1.0 (up to the reciprocal's rounding): many ties
        x[3, 1:] = torch.round(torch.randn(cols - 1, generator=g) * 40) + 0.5
    if rows > 4 and dtype != torch.float16:
        x[4, cols // 2] = 99840.0  # past 65504: fp16 inf, so SCB = inf and an all-zero row (bnb's bytes)
    return x.to(dtype)


def _bnb_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, scb, _ = torch.ops.bitsandbytes.int8_vectorwise_quant.default(x.to(torch.float16), 0.0)
    return q, scb


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_matches_bitsandbytes_on_every_isa_and_thread_count(dtype, shape):
    x = _edge_rows(shape, dtype, seed=shape[0] * 1000 + shape[1])
    ref_q, ref_scb = _bnb_quant(x)
    for isa in ISAS:
        for threads in (1, 2, 7):
            q, scb = k8.quantize_int8(x, isa=isa, threads=threads)
            assert torch.equal(q, ref_q), (isa, threads)
            assert torch.equal(scb.view(torch.int32), ref_scb.view(torch.int32)), (isa, threads)


def test_overflow_and_zero_rows_store_what_bitsandbytes_stores():
    x = _edge_rows((8, 40), torch.bfloat16, seed=1)
    q, scb = k8.quantize_int8(x)
    assert scb[1] == 0
    assert not q[1].any()
    assert scb[4] == float("inf")
    assert not q[4].any()
    assert int(q.abs().max()) == 127
    assert int(q.min()) >= -127


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_scale_matches_the_reference_table(dtype):
    x = _edge_rows((200, 75), dtype, seed=7)
    ref_q, ref_scb = int8.quantize_int8(x.float().numpy(), "cuda")
    cpu_q, _ = int8.quantize_int8(x.float().numpy(), "cpu")
    for isa in ISAS:
        q, scb = k8.quantize_int8(x, scale="cuda", isa=isa, threads=3)
        assert np.array_equal(q.numpy(), ref_q), isa
        assert np.array_equal(scb.numpy().view(np.uint32), ref_scb.view(np.uint32)), isa
    # Same SCB on both devices, and codes at most 1 apart (bnb-int8.md §4).
    assert int(np.abs(ref_q.astype(np.int16) - cpu_q.astype(np.int16)).max()) <= 1


def test_cuda_scale_table_differs_from_cpu_exactly_at_the_measured_values():
    table = int8.cuda_scale_table()
    cpu = int8.row_scales(np.arange(int8.TABLE_SIZE, dtype=np.uint16).view(np.float16).astype(np.float32))
    differ = np.flatnonzero(table.view(np.uint32) != cpu.view(np.uint32))
    assert len(differ) == 3996  # the H200 measurement's count of 31,745 fp16 absmax values
    assert differ[0] == 0x0021
    assert abs(int(table.view(np.uint32)[0x21]) - int(cpu.view(np.uint32)[0x21])) == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_or_inf_input_is_refused(dtype):
    x = torch.zeros(4, 20, dtype=dtype)
    x[2, 3] = float("nan")
    with pytest.raises(kernels.NonFiniteInputError, match="1 of 4 rows"):
        k8.quantize_int8(x)
    x[2, 3] = float("inf")
    with pytest.raises(kernels.NonFiniteInputError):
        k8.quantize_int8(x)


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_matches_bitsandbytes(out_dtype, shape):
    x = _edge_rows(shape, torch.bfloat16, seed=shape[1])
    q, scb = _bnb_quant(x)
    ref = torch.ops.bitsandbytes.int8_vectorwise_dequant.default(q, scb).to(out_dtype)
    for isa in ISAS:
        for threads in (1, 7):
            w = k8.dequantize_int8(q, scb, out_dtype=out_dtype, isa=isa, threads=threads)
            nan = torch.isnan(ref)
            assert torch.equal(torch.isnan(w), nan), (isa, threads)  # the SCB = inf row (NaN payloads differ)
            assert torch.equal(w[~nan], ref[~nan]), (isa, threads)


def test_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match="x has shape"):
        k8.quantize_int8(torch.zeros(8))
    with pytest.raises(ValueError, match="unknown int8 scale"):
        k8.quantize_int8(torch.zeros(2, 2), scale="gpu")
    with pytest.raises(ValueError, match="scb has 3 elements"):
        k8.dequantize_int8(torch.zeros(2, 2, dtype=torch.int8), torch.zeros(3))
    with pytest.raises(ValueError, match="batch 9"):
        k8.gemv_int8(torch.zeros(9, 4), torch.zeros(2, 4, dtype=torch.int8), torch.zeros(2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("in_features", [64, 515])
def test_gemv_matches_dequantize_matmul(dtype, batch, in_features):
    g = torch.Generator().manual_seed(batch + in_features)
    q, scb = k8.quantize_int8(torch.randn(300, in_features, generator=g) * 0.05)
    x = torch.randn(batch, in_features, generator=g).to(dtype)
    w = torch.from_numpy(int8.dequantize_int8(q.numpy(), scb.numpy())).double()
    ref = x.double() @ w.T
    # Error budget: float32 accumulation of K products |x||w| (gamma_K = K u / (1 - K u), u = 2^-24),
    # plus the f32 weight and scale roundings (2u per product), plus the output cast (one ulp of the dtype
    # at |y|, i.e. eps * |y|).
    u = 2.0**-24
    k = in_features
    gamma = (k + 2) * u / (1 - (k + 2) * u)
    mag = x.double().abs() @ w.abs().T
    bound = gamma * mag + torch.finfo(dtype).eps * ref.abs() + 1e-30
    for isa in ISAS:
        y = k8.gemv_int8(x, q, scb, isa=isa, threads=2)
        assert y.dtype == dtype
        assert y.shape == (batch, 300)
        assert bool(((y.double() - ref).abs() <= bound).all()), isa
    assert torch.equal(k8.gemv_int8(x[0].contiguous(), q, scb), k8.gemv_int8(x[:1].contiguous(), q, scb)[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_bias_is_added_in_the_input_dtype(dtype):
    """bias: the bits of ``gemv(x) + bias`` (the CUDA kernel fuses that add with the same bits)."""
    q, scb = k8.quantize_int8(torch.randn(40, 96) * 0.05)
    x = torch.randn(2, 96).to(dtype)
    bias = torch.randn(40).to(dtype)
    assert torch.equal(k8.gemv_int8(x, q, scb, bias), k8.gemv_int8(x, q, scb) + bias)
    with pytest.raises(ValueError, match="bias has 39 elements"):
        k8.gemv_int8(x, q, scb, bias[:39])


def test_quantize_into_given_buffers() -> None:
    x = _edge_rows((9, 33), torch.bfloat16, seed=5)
    codes, scb = torch.full((9 * 33,), 99, dtype=torch.int8), torch.empty(9)
    q, s = k8.quantize_int8(x, out=(codes, scb))
    assert q.data_ptr() == codes.data_ptr()
    assert s.data_ptr() == scb.data_ptr()
    ref_q, ref_scb = k8.quantize_int8(x)
    assert torch.equal(q, ref_q)
    assert torch.equal(s, ref_scb)
    with pytest.raises(ValueError, match="out codes has 10 elements"):
        k8.quantize_int8(x, out=(torch.empty(10, dtype=torch.int8), scb))
