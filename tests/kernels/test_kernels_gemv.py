"""gemv_4bit vs a float64 dequantize + matmul, within the derived float32-accumulation bound.

What the CPU paths compute (csrc/gemv_cpu.cpp): x widened exactly to float32; the scalar path sums
x * float32(quant_map[q] * absmax) in float64, the AVX2 path accumulates the same float32 weights with
FMAs, the AVX-512 path either does that or sums quant_map[q] * x over a block and scales the block's
sum by its absmax (each weight then used as quant_map[q] * absmax unrounded: relative error <= 2^-24
against the decoded float32 weight). Then one rounding to x's dtype. So every path is within
error_bounds.dot_bound(weight_rel=2^-24) of the float64 product with the decoded weight.
"""

from __future__ import annotations

import pytest
import torch
from error_bounds import dot_bound, gemv_arithmetic, worst_ratio
from kernel_helpers import DTYPES, codebook_tensor, dynamic8_tensor

from converter.kernels import bnb4bit as kernels
from formats.quant_types import QuantType


def _weight(out_features, in_features, blocksize, quant_type, nested, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g, dtype=torch.float32).to(torch.bfloat16)
    packed, absmax = kernels.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    qm = codebook_tensor(quant_type)
    record = None
    if nested:
        codes, nested_absmax, offset = kernels.quantize_nested(absmax)
        record = kernels.NestedAbsmax(codes, nested_absmax, offset, dynamic8_tensor())
        absmax = kernels.dequantize_nested(*record)
    dense = kernels.dequantize_4bit(
        packed, absmax, n=w.numel(), blocksize=blocksize, quant_map=qm, out_dtype=torch.float32
    ).view(out_features, in_features)
    return packed, (None if nested else absmax), record, qm, dense


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nested", [False, True], ids=["f32-absmax", "nested"])
@pytest.mark.parametrize(
    ("out_features", "in_features", "blocksize", "quant_type"),
    [
        (1, 64, 64, QuantType.NF4),
        (37, 256, 32, QuantType.NF4),
        (300, 1024, 64, QuantType.NF4),
        (29, 576, 64, QuantType.NF4),  # K % 128 == 64: avx512bf16's half group; rows past whole tiles
        # 65 blocks a row: avx512bf16 decodes nested absmax 16 blocks at a time, across nested blocks
        (40, 4160, 64, QuantType.NF4),
        (64, 4096, 4096, QuantType.NF4),
        (23, 384, 128, QuantType.FP4),
        (18, 4096, 2048, QuantType.FP4),
    ],
    ids=lambda v: v.label if isinstance(v, QuantType) else str(v),
)
def test_gemv_matches_dequantize_matmul(dtype, nested, out_features, in_features, blocksize, quant_type):
    packed, absmax, record, qm, dense = _weight(out_features, in_features, blocksize, quant_type, nested, 0)
    for batch in range(1, 9):
        x = torch.randn(batch, in_features, generator=torch.Generator().manual_seed(batch)).to(dtype)
        for isa in kernels.cpu_isas():
            # Block-sum scaling (weight_rel 2^-24; avx512bf16 with bf16 x: code values rounded to
            # bf16 too), float32 accumulation of K terms, rounding to dtype.
            ref, bound = dot_bound(x, dense, out_dtype=dtype, **gemv_arithmetic("cpu", dtype, isa))
            y = _gemv(x, packed, absmax, record, qm, blocksize, isa=isa)
            assert y.dtype == dtype
            assert y.shape == (batch, out_features)
            worst = worst_ratio(y, ref, bound)
            assert worst <= 1.0, f"batch={batch} isa={isa}: error {worst:.3g} x the derived bound"


def _gemv(x, packed, absmax, record, qm, blocksize, *, isa="auto"):
    out_features = packed.numel() * 2 // x.shape[-1]
    return kernels.gemv_4bit(
        x,
        packed,
        absmax,
        out_features=out_features,
        in_features=x.shape[-1],
        blocksize=blocksize,
        quant_map=qm,
        nested=record,
        isa=isa,
        threads=3,
    )


@pytest.mark.parametrize("corruption", ["scale x1.25", "block dropped"])
def test_bound_catches_a_wrong_block_scale_or_a_dropped_block(corruption):
    """The bound is tight enough to matter: one block of one row decoded with a wrong absmax (a wrong
    nested decode, an off-by-one block index) or skipped altogether puts that row outside it."""
    out_features, in_features, blocksize = 24, 4096, 64
    packed, absmax, record, qm, dense = _weight(out_features, in_features, blocksize, QuantType.NF4, False, 3)
    x = torch.randn(1, in_features, generator=torch.Generator().manual_seed(7))
    ref, bound = dot_bound(x, dense, out_dtype=torch.float32, **gemv_arithmetic("cpu", torch.float32))
    row = 5
    # The block of that row that contributes most to its output: the corruption must show there.
    contrib = (x[0].double() * dense[row].double()).view(-1, blocksize).sum(1).abs()
    block = row * (in_features // blocksize) + int(contrib.argmax())
    bad = absmax.clone()
    bad[block] = bad[block] * 1.25 if corruption == "scale x1.25" else 0.0
    for isa in kernels.cpu_isas():
        good = _gemv(x, packed, absmax, record, qm, blocksize, isa=isa)
        assert worst_ratio(good, ref, bound) <= 1.0, isa
        y = _gemv(x, packed, bad, None, qm, blocksize, isa=isa)
        err_ratio = (y.double() - ref).abs() / bound
        assert float(err_ratio[0, row]) > 1.0, f"{isa}: {corruption} in block {block} passed the bound"
        others = torch.cat([err_ratio[0, :row], err_ratio[0, row + 1 :]])
        assert float(others.max()) <= 1.0, isa  # only the corrupted row moved


def test_gemv_fp4_and_one_dimensional_input():
    packed, absmax, _, qm, dense = _weight(48, 128, 32, QuantType.FP4, False, 1)
    x = torch.randn(128)
    y = kernels.gemv_4bit(x, packed, absmax, out_features=48, in_features=128, blocksize=32, quant_map=qm)
    assert y.shape == (48,)
    ref, bound = dot_bound(x[None], dense, out_dtype=torch.float32, **gemv_arithmetic("cpu", torch.float32))
    assert worst_ratio(y[None], ref, bound) <= 1.0


def test_gemv_refuses_what_it_cannot_fuse():
    packed, absmax, _, qm, _ = _weight(8, 96, 32, QuantType.NF4, False, 2)
    args = dict(out_features=8, in_features=96, blocksize=64, quant_map=qm)
    with pytest.raises(ValueError, match="in_features 96 is not a positive multiple of blocksize 64"):
        kernels.gemv_4bit(torch.randn(1, 96), packed, absmax[:12], **args)
    args["blocksize"] = 32
    with pytest.raises(ValueError, match=r"x has batch 9: the fused GEMV takes 1\.\.8"):
        kernels.gemv_4bit(torch.randn(9, 96), packed, absmax, **args)
    with pytest.raises(ValueError, match=r"x has shape \(1, 95\): expected \[B, 96\]"):
        kernels.gemv_4bit(torch.randn(1, 95), packed, absmax, **args)
    with pytest.raises(ValueError, match="pass exactly one of absmax"):
        kernels.gemv_4bit(torch.randn(1, 96), packed, None, **args)


@pytest.mark.skipif("avx512bf16" not in kernels.cpu_isas(), reason="this CPU lacks AVX512_BF16")
@pytest.mark.parametrize(("in_features", "blocksize"), [(576, 64), (1024, 128), (4096, 4096), (96, 32)])
def test_avx512bf16_takes_its_own_path_only_for_bfloat16_x(in_features, blocksize):
    """avx512bf16 runs vdpbf16ps (code values rounded to bf16) for bf16 x with blocksize >= 64, and is
    the exact avx512 path bit for bit otherwise (fp16 / fp32 x, blocksize 32)."""
    packed, absmax, _, qm, dense = _weight(40, in_features, blocksize, QuantType.NF4, False, 4)
    for dtype in DTYPES:
        x = torch.randn(8, in_features, generator=torch.Generator().manual_seed(5)).to(dtype)
        y = _gemv(x, packed, absmax, None, qm, blocksize, isa="avx512bf16")
        exact = _gemv(x, packed, absmax, None, qm, blocksize, isa="avx512")
        own_path = dtype == torch.bfloat16 and blocksize >= 64
        assert torch.equal(y, exact) != own_path, dtype
        ref, bound = dot_bound(x, dense, out_dtype=dtype, **gemv_arithmetic("cpu", dtype, "avx512bf16"))
        assert worst_ratio(y, ref, bound) <= 1.0, dtype


@pytest.mark.skipif("avx512bf16" not in kernels.cpu_isas(), reason="this CPU lacks AVX512_BF16")
def test_avx512bf16_flushes_subnormal_x_within_the_bound():
    """vdpbf16ps treats subnormal inputs as zero: an x of subnormals gives 0 (the exact path does not),
    which flush_abs in gemv_arithmetic covers; normal x next to them is unaffected."""
    packed, absmax, _, qm, dense = _weight(16, 256, 64, QuantType.NF4, False, 6)
    tiny = torch.full((1, 256), 2.0**-130).to(torch.bfloat16)  # subnormal in bf16 and float32
    y = _gemv(tiny, packed, absmax, None, qm, 64, isa="avx512bf16")
    assert torch.equal(y, torch.zeros_like(y))
    assert _gemv(tiny.float(), packed, absmax, None, qm, 64, isa="avx512bf16").abs().max() > 0
    ref, bound = dot_bound(
        tiny, dense, out_dtype=torch.bfloat16, **gemv_arithmetic("cpu", torch.bfloat16, "avx512bf16")
    )
    assert worst_ratio(y, ref, bound) <= 1.0
    x = torch.cat([tiny[:, :128], torch.randn(1, 128).to(torch.bfloat16)], dim=1)
    y = _gemv(x, packed, absmax, None, qm, 64, isa="avx512bf16")
    ref, bound = dot_bound(
        x, dense, out_dtype=torch.bfloat16, **gemv_arithmetic("cpu", torch.bfloat16, "avx512bf16")
    )
    assert worst_ratio(y, ref, bound) <= 1.0


def _quantized(w: torch.Tensor, blocksize: int):
    """(packed, absmax, quant_map, exact float32 decode) of a float weight, NF4."""
    packed, absmax = kernels.quantize_4bit(w, blocksize=blocksize, quant_type=QuantType.NF4)
    qm = codebook_tensor(QuantType.NF4)
    dense = kernels.dequantize_4bit(
        packed, absmax, n=w.numel(), blocksize=blocksize, quant_map=qm, out_dtype=torch.float32
    ).view(w.shape)
    return packed, absmax, qm, dense


needs_avx2 = pytest.mark.skipif("avx2" not in kernels.cpu_isas(), reason="this CPU lacks AVX2")


@needs_avx2
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_avx2_holds_16bit_x_as_integers_per_chunk(dtype):
    """AVX2 with 16-bit x multiplies 15-bit integers, x scaled per 64 elements: an element far below
    its chunk's largest loses its low bits. Here each chunk's large first element meets weights of 0.0,
    so y is the small elements' sum alone: within the bound with gemv_arithmetic's x_chunk_rel, outside
    it without (the integer path ran). float32 x of the same values keeps the exact f32 path."""
    out_features, in_features, blocksize = 16, 256, 64
    g = torch.Generator().manual_seed(8)
    w = torch.randn(out_features, in_features, generator=g)
    w[:, ::64] = 0.0  # NF4 code 7 decodes to exactly 0.0
    packed, absmax, qm, dense = _quantized(w, blocksize)
    x = (torch.randn(2, in_features, generator=g) * 1e-3).to(dtype)
    x[:, ::64] = 1000.0
    y = _gemv(x, packed, absmax, None, qm, blocksize, isa="avx2")
    arithmetic = gemv_arithmetic("cpu", dtype, "avx2")
    ref, bound = dot_bound(x, dense, out_dtype=dtype, **arithmetic)
    assert worst_ratio(y, ref, bound) <= 1.0
    without = {k: v for k, v in arithmetic.items() if k != "x_chunk_rel"}
    assert worst_ratio(y, *dot_bound(x, dense, out_dtype=dtype, **without)) > 1.0
    y32 = _gemv(x.float(), packed, absmax, None, qm, blocksize, isa="avx2")
    assert worst_ratio(y32, *dot_bound(x.float(), dense, out_dtype=torch.float32, **without)) <= 1.0


@needs_avx2
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_avx2_integer_chunk_sums_do_not_overflow(sign):
    """The largest chunk sums the integer path can form (every x at its chunk's largest magnitude, every
    code value +-1: 8 products of 16383^2 per int32 lane) stay below 2^31: y is exactly +-K."""
    in_features = 4096
    packed, absmax, qm, _ = _quantized(torch.ones(8, in_features), 64)
    x = torch.full((1, in_features), sign, dtype=torch.bfloat16)
    y = _gemv(x, packed, absmax, None, qm, 64, isa="avx2")
    assert torch.equal(y, torch.full((1, 8), sign * in_features, dtype=torch.bfloat16))


@needs_avx2
@pytest.mark.parametrize("case", ["inf", "nan", "tiny chunk"])
def test_avx2_takes_the_exact_path_where_x_does_not_scale(case):
    """x that is not finite, or a chunk whose largest |x| is below 2^-100 but not 0, cannot be scaled to
    integers: the call runs the exact f32 path, so y is the float32 x's result rounded to x's dtype, bit
    for bit (NaN where it has NaN), instead of integers of a scale that overflowed."""
    packed, absmax, qm, _ = _quantized(torch.randn(24, 512, generator=torch.Generator().manual_seed(9)), 64)
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(10)).to(torch.bfloat16)
    if case == "tiny chunk":
        x[1, 64:128] = 2.0**-110
    else:
        x[1, 100] = float(case)
    y = _gemv(x, packed, absmax, None, qm, 64, isa="avx2")
    exact = _gemv(x.float(), packed, absmax, None, qm, 64, isa="avx2").to(torch.bfloat16)
    assert torch.equal(y.isnan(), exact.isnan())
    assert torch.equal(y.nan_to_num(0.0), exact.nan_to_num(0.0))


@needs_avx2
@pytest.mark.parametrize("table", ["NaN value", "all zeros"])
def test_avx2_takes_the_exact_path_for_a_table_integers_cannot_hold(table):
    """A quant_map with a value that is not finite, or of zeros only, has no integer scale: its rows run
    the exact f32 path on x widened for them, so y equals the float32 x's result rounded to x's dtype."""
    packed, absmax, qm, _ = _quantized(torch.randn(24, 512, generator=torch.Generator().manual_seed(11)), 64)
    qm = qm.clone()
    if table == "NaN value":
        qm[3] = float("nan")
    else:
        qm.zero_()
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(12)).to(torch.bfloat16)
    y = _gemv(x, packed, absmax, None, qm, 64, isa="avx2")
    exact = _gemv(x.float(), packed, absmax, None, qm, 64, isa="avx2").to(torch.bfloat16)
    assert torch.equal(y.isnan(), exact.isnan())
    assert torch.equal(y.nan_to_num(0.0), exact.nan_to_num(0.0))
