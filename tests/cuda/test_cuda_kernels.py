"""CUDA kernels vs the CPU kernels (and formats.reference): the same bytes for every option.

The promise is identical bytes, so every check is torch.equal / array_equal, except the GEMV, which
is held elementwise to the bound derived from its arithmetic (tests/error_bounds.py: code values rounded
to the activation type on the tensor-core path, float32 accumulation of K terms, output rounding),
against a float64 reference (see _gemv_case).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cuda_helpers import DTYPES, SIZES, awkward_input
from error_bounds import dot_bound, gemv_arithmetic, worst_ratio

from converter.kernels import bnb4bit as kernels
from formats import codebooks, reference
from formats.quant_types import BLOCKSIZES, QuantType

pytestmark = pytest.mark.cuda

QTYPES = (QuantType.NF4, QuantType.FP4)


def _kc():
    from converter.kernels import bnb4bit_cuda as kernels_cuda

    return kernels_cuda


def _dynamic8() -> torch.Tensor:
    return torch.tensor(codebooks.DYNAMIC8, dtype=torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", QTYPES, ids=lambda q: q.label)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_quantize_and_nested_match_cpu(dtype, quant_type, blocksize):
    for i, n in enumerate(SIZES):
        x = awkward_input(n, blocksize, dtype, seed=1000 * blocksize + i)
        packed_c, absmax_c = kernels.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
        packed_g, absmax_g = kernels.quantize_4bit(x.cuda(), blocksize=blocksize, quant_type=quant_type)
        assert torch.equal(packed_g.cpu(), packed_c), f"packed differs, n={n}"
        assert torch.equal(absmax_g.cpu().view(torch.int32), absmax_c.view(torch.int32)), f"absmax n={n}"
        codes_c, nabs_c, off_c = kernels.quantize_nested(absmax_c)
        codes_g, nabs_g, off_g = kernels.quantize_nested(absmax_g)
        assert torch.equal(codes_g.cpu(), codes_c), f"nested codes differ, n={n}"
        assert torch.equal(nabs_g.cpu().view(torch.int32), nabs_c.view(torch.int32)), f"nested absmax n={n}"
        assert np.float32(off_g).tobytes() == np.float32(off_c).tobytes(), f"offset n={n}"
        fused = _kc().quantize_4bit_nested(x.cuda(), blocksize=blocksize, quant_type=quant_type)
        assert torch.equal(fused[0].cpu(), packed_c)
        assert torch.equal(fused[1].cpu(), codes_c)
        assert torch.equal(fused[2].cpu(), nabs_c)
        assert fused[3] == off_c


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", QTYPES, ids=lambda q: q.label)
def test_quantize_matches_numpy_reference(dtype, quant_type):
    for blocksize in (32, 64, 4096):
        x = awkward_input(20_001, blocksize, dtype, seed=blocksize)
        packed_g, absmax_g = kernels.quantize_4bit(x.cuda(), blocksize=blocksize, quant_type=quant_type)
        packed_r, absmax_r = reference.quantize_4bit(x.float().numpy(), blocksize, quant_type)
        np.testing.assert_array_equal(packed_g.cpu().numpy(), packed_r)
        np.testing.assert_array_equal(absmax_g.cpu().numpy().view(np.uint32), absmax_r.view(np.uint32))
        codes_r, nabs_r, off_r = reference.quantize_nested(absmax_r)
        codes_g, nabs_g, off_g = kernels.quantize_nested(absmax_g)
        np.testing.assert_array_equal(codes_g.cpu().numpy(), codes_r)
        np.testing.assert_array_equal(nabs_g.cpu().numpy(), nabs_r)
        assert np.float32(off_g) == off_r


def test_large_tensor_and_unaligned_input():
    # More than one chunk of 1024 absmax many times over, and an input that is not 16-byte aligned.
    base = torch.randn(3_000_001, dtype=torch.bfloat16)
    x = base[1:]  # 2-byte offset: the scalar load path
    for t in (x, base):
        p_c, a_c = kernels.quantize_4bit(t.contiguous(), blocksize=64, quant_type=QuantType.NF4)
        p_g, a_g = kernels.quantize_4bit(t.cuda(), blocksize=64, quant_type=QuantType.NF4)
        assert torch.equal(p_g.cpu(), p_c)
        assert torch.equal(a_g.cpu(), a_c)
        c_c, n_c, o_c = kernels.quantize_nested(a_c)
        c_g, n_g, o_g = kernels.quantize_nested(a_g)
        assert torch.equal(c_g.cpu(), c_c)
        assert torch.equal(n_g.cpu(), n_c)
        assert o_g == o_c
    gpu_base = base.cuda()
    p_u, _ = kernels.quantize_4bit(gpu_base[1:], blocksize=64, quant_type=QuantType.NF4)
    p_c, _ = kernels.quantize_4bit(x.contiguous(), blocksize=64, quant_type=QuantType.NF4)
    assert torch.equal(p_u.cpu(), p_c)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises(bad):
    x = torch.randn(1000, device="cuda")
    x[517] = bad
    with pytest.raises(kernels.NonFiniteInputError, match="NaN or Inf"):
        kernels.quantize_4bit(x, blocksize=64, quant_type=QuantType.NF4)
    with pytest.raises(kernels.NonFiniteInputError):
        _kc().quantize_4bit_nested(x, blocksize=64, quant_type=QuantType.NF4)


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", QTYPES, ids=lambda q: q.label)
def test_dequantize_matches_cpu(out_dtype, quant_type):
    qmap = torch.tensor(quant_type.codebook, dtype=torch.float32)
    dmap = _dynamic8()
    for blocksize in BLOCKSIZES:
        for n in (1, 33, 4097, 65537, 300_001):
            x = awkward_input(n, blocksize, torch.float32, seed=n + blocksize)
            packed, absmax = kernels.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
            codes, nabs, off = kernels.quantize_nested(absmax)
            want = kernels.dequantize_4bit(
                packed, absmax, n=n, blocksize=blocksize, quant_map=qmap, out_dtype=out_dtype
            )
            got = kernels.dequantize_4bit(
                packed.cuda(),
                absmax.cuda(),
                n=n,
                blocksize=blocksize,
                quant_map=qmap.cuda(),
                out_dtype=out_dtype,
            )
            assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8)), f"bs={blocksize} n={n}"
            # nested: CPU un-nests then dequantizes; CUDA decodes inline (and through dequantize_nested)
            am_c = kernels.dequantize_nested(codes, nabs, off, dmap)
            want_n = kernels.dequantize_4bit(
                packed, am_c, n=n, blocksize=blocksize, quant_map=qmap, out_dtype=out_dtype
            )
            am_g = kernels.dequantize_nested(codes.cuda(), nabs.cuda(), off, dmap.cuda())
            assert torch.equal(am_g.cpu(), am_c)
            got_n = _kc().dequantize_4bit(
                packed.cuda(),
                None,
                n=n,
                blocksize=blocksize,
                quant_map=qmap.cuda(),
                out_dtype=out_dtype,
                nested=(codes.cuda(), nabs.cuda(), off, dmap.cuda()),
            )
            same = torch.equal(got_n.cpu().view(torch.uint8), want_n.view(torch.uint8))
            assert same, f"nested bs={blocksize} n={n}"


def _gemv_case(
    out_f,
    in_f,
    batch,
    dtype,
    blocksize,
    nested,
    quant_type=QuantType.NF4,
    misalign=False,
    variant=0,
    codes_offset=0,
):
    w = torch.randn(out_f, in_f) * 0.05
    packed, absmax = kernels.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    qmap = torch.tensor(quant_type.codebook, dtype=torch.float32)
    nest = None
    if nested:
        codes, nabs, off = kernels.quantize_nested(absmax)
        # codes_offset: the codes as a view that is not 4-byte aligned (the CUDA-core fallback)
        codes_dev = torch.empty(codes.numel() + codes_offset, dtype=torch.uint8, device="cuda")[codes_offset:]
        codes_dev.copy_(codes)
        nest = (codes_dev, nabs.cuda(), off, _dynamic8().cuda())
        absmax = kernels.dequantize_nested(codes, nabs, off, _dynamic8())
    w_deq = kernels.dequantize_4bit(
        packed, absmax, n=w.numel(), blocksize=blocksize, quant_map=qmap, out_dtype=torch.float32
    ).view(out_f, in_f)
    if misalign:
        buf = torch.randn(batch * in_f + 1, dtype=dtype, device="cuda")
        x = buf[1:].view(batch, in_f)
    else:
        x = torch.randn(batch, in_f, dtype=dtype, device="cuda")
    y = _kc().gemv_4bit(
        x,
        packed.cuda(),
        None if nested else absmax.cuda(),
        out_features=out_f,
        in_features=in_f,
        blocksize=blocksize,
        quant_map=qmap.cuda(),
        nested=nest,
        variant=variant,
    )
    assert y.dtype == dtype
    assert y.shape == (batch, out_f)
    where = f"({out_f}x{in_f}, B={batch}, bs={blocksize}, variant={variant})"
    # The kernel's arithmetic (error_bounds.gemv_arithmetic): 16-bit x rounds code values to x's dtype
    # and accumulates on tensor cores (unit roundoff 2^-23), float32 x uses float32 FMAs; block sums
    # scaled by absmax; the result rounded to x's dtype. Reference: float64 with the exact decode.
    ref, bound = dot_bound(x, w_deq, out_dtype=dtype, **gemv_arithmetic("cuda", dtype))
    worst = worst_ratio(y, ref, bound)
    assert worst <= 1.0, f"gemv error {worst:.2f}x the derived bound {where}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 6, 7, 8])
def test_gemv_within_torch_error(dtype, batch):
    for out_f, in_f in ((4096, 4096), (1536, 384), (384, 1536), (576, 576), (3, 64), (117, 256)):
        _gemv_case(out_f, in_f, batch, dtype, 64, nested=batch % 2 == 0)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_gemv_blocksizes_and_generic_path(blocksize):
    _gemv_case(257, 4096, 1, torch.bfloat16, blocksize, nested=True, quant_type=QuantType.FP4)
    _gemv_case(33, 4096, 3, torch.float16, blocksize, nested=False, misalign=True)  # generic kernel
    _gemv_case(11, 4096 + blocksize, 2, torch.float32, blocksize, nested=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemv_four_rows_per_warp(dtype):
    # N >= 8192 takes the 4-rows-per-warp kernel; 8194 leaves a warp with 2 of its 4 rows.
    for batch in range(1, 9):
        _gemv_case(8194, 256, batch, dtype, 64, nested=batch % 2 == 1)


@pytest.mark.parametrize("variant", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("batch", [1, 2])
def test_gemv_forced_configurations(variant, batch):
    for out_f, in_f in ((4096, 4096), (17, 8192), (3, 64)):
        _gemv_case(out_f, in_f, batch, torch.bfloat16, 64, nested=True, variant=variant)
        _gemv_case(out_f, in_f, batch, torch.float32, 32, nested=False, variant=variant)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("variant", [6, 7, 8, 9])  # tensor-core kernel, 1/2/4/8 warps per row tile
def test_gemv_tensor_core_splits(dtype, variant):
    # Odd row counts (partial 16-row tiles), k not a multiple of the 256-weight tile (a partial last
    # tile), blocks of 32 to 4096 (1 to 8 chunks per block, or one block over many tiles), batch 1..8.
    cases = (
        (17, 96, 32),
        (33, 288, 32),
        (4097, 4160, 64),
        (250, 1152, 128),
        (64, 8192, 4096),
        (31, 1280, 256),
        (40, 1536, 512),
    )
    for i, (out_f, in_f, bs) in enumerate(cases):
        for batch in (1, 3, 8):
            _gemv_case(out_f, in_f, batch, dtype, bs, nested=(i + batch) % 2 == 0, variant=variant)
    _gemv_case(300, 2048, 2, dtype, 64, nested=False, quant_type=QuantType.FP4, variant=variant)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gemv_cuda_core_kernel_every_batch(dtype):
    # variant 10: the CUDA-core kernel's default configuration, also for 16-bit x
    for batch in range(1, 9):
        _gemv_case(4097, 512, batch, dtype, 64, nested=batch % 2 == 0, variant=10)


@pytest.mark.parametrize("codes_offset", [1, 2, 3])
def test_gemv_unaligned_nested_codes_fall_back(codes_offset):
    _gemv_case(129, 512, 2, torch.bfloat16, 64, nested=True, codes_offset=codes_offset)


def test_gemv_is_deterministic():
    w = torch.randn(4096, 4096) * 0.05
    packed, absmax = kernels.quantize_4bit(w, blocksize=64, quant_type=QuantType.NF4)
    qmap = torch.tensor(QuantType.NF4.codebook, dtype=torch.float32, device="cuda")
    x = torch.randn(4, 4096, dtype=torch.bfloat16, device="cuda")
    args = dict(out_features=4096, in_features=4096, blocksize=64, quant_map=qmap)
    ys = [_kc().gemv_4bit(x, packed.cuda(), absmax.cuda(), **args) for _ in range(3)]
    assert all(torch.equal(ys[0], y) for y in ys[1:])


def test_backend_info_names_the_device():
    info = _kc().backend_info()
    assert info is not None
    assert info["devices"][0]["name"] == torch.cuda.get_device_name(0)
    assert "cuda" in kernels.available_backends()
