"""The lean tensor-core GEMV (csrc/cuda/gemv_stream.cu, variants 11..18, ``QM_CUDA_GEMV=stream``).

Each result is held elementwise to the bound derived from its arithmetic (tests/error_bounds.py,
``gemv_arithmetic("cuda", 16-bit dtype)``: code values rounded to x's dtype, tensor-core float32
accumulation with truncation (unit roundoff 2^-23) over the K terms in any order, which covers the
per-segment absmax scaling, the split-warp and K-slice partial sums, and the result's rounding to x's
dtype), against a float64 reference of the exactly decoded weight; the gemv_mma.cu kernel (variant 20)
is held to the same bound on the same inputs, so the two agree to within the sum of their bounds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import cache

import pytest
import torch
from error_bounds import dot_bound, gemv_arithmetic, worst_ratio

from converter.kernels import bnb4bit as kernels
from formats import codebooks
from formats.quant_types import QuantType

STREAM, MMA = 11, 20
#: Forced configurations: intra-CTA split 1/2/4/8 (12..15), 2/4/8 K slices across CTAs (16..18).
FORCED = (12, 13, 14, 15, 16, 17, 18)


def _kc():
    from converter.kernels import bnb4bit_cuda as kernels_cuda

    return kernels_cuda


@cache  # the parametrized tests share weights; the kernels never write them
def _weight(out_f, in_f, blocksize, nested, quant_type=QuantType.NF4, seed=0):
    """(args for kernels_cuda.gemv_4bit, the float32 decoded weight [out_f, in_f])."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) * 0.05
    packed, absmax = kernels.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    qmap = torch.tensor(quant_type.codebook, dtype=torch.float32)
    args = dict(out_features=out_f, in_features=in_f, blocksize=blocksize, quant_map=qmap.cuda(), nested=None)
    if nested:
        dmap = torch.tensor(codebooks.DYNAMIC8, dtype=torch.float32)
        codes, nabs, off = kernels.quantize_nested(absmax)
        args["nested"] = (codes.cuda(), nabs.cuda(), off, dmap.cuda())
        absmax = kernels.dequantize_nested(codes, nabs, off, dmap)
    w_deq = kernels.dequantize_4bit(
        packed, absmax, n=w.numel(), blocksize=blocksize, quant_map=qmap, out_dtype=torch.float32
    ).view(out_f, in_f)
    gemv_absmax = None if nested else absmax.cuda()
    return (packed.cuda(), gemv_absmax, args), w_deq


def _check(weight, w_deq, batch, dtype, variants, where="", bias=False):
    (packed, absmax, args) = weight
    x = torch.randn(batch, w_deq.shape[1], dtype=dtype, device="cuda")
    b = torch.randn(w_deq.shape[0], dtype=dtype, device="cuda") if bias else None
    # 16-bit x: code values rounded to x's dtype, truncating float32 tensor-core sums (both kernels)
    ref, bound = dot_bound(x, w_deq, out_dtype=dtype, bias=b, **gemv_arithmetic("cuda", dtype))
    ys = {}
    for v in variants:
        y = _kc().gemv_4bit(x, packed, absmax, variant=v, **args)
        if b is not None:
            y = y + b  # the loader's order: gemv in x's dtype, then the bias added in x's dtype
        assert y.dtype == dtype
        assert y.shape == (batch, w_deq.shape[0])
        worst = worst_ratio(y, ref, bound)
        assert worst <= 1.0, f"variant {v}: error {worst:.2f}x the derived bound {where} B={batch}"
        ys[v] = y
    return ys


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_stream_matches_reference_and_mma_kernel(dtype, nested):
    # Odd row counts (partial 16-row tiles, one row), K of 1, 3, 16 and 17 k tiles, every batch.
    shapes = ((1, 256), (3, 768), (17, 4096), (255, 4352), (257, 512), (1000, 1024))
    for i, (out_f, in_f) in enumerate(shapes):
        weight, w_deq = _weight(out_f, in_f, 64, nested, seed=i)
        for batch in range(1, 9):
            _check(weight, w_deq, batch, dtype, (STREAM, MMA), f"({out_f}x{in_f}, bs 64)")


@pytest.mark.cuda
@pytest.mark.parametrize("blocksize", [64, 128, 256, 512, 1024, 4096])
def test_stream_blocksizes_and_fp4(blocksize):
    # Blocks of 1 to 4 segments per tile and blocks spanning many tiles; nested absmax blocks of 256
    # crossing tiles and rows (8192-wide rows of blocksize 64: 128 blocks per row).
    for j, (out_f, in_f) in enumerate(((33, 8192), (130, 4096))):
        for nested in (False, True):
            weight, w_deq = _weight(out_f, in_f, blocksize, nested, seed=blocksize + j)
            for batch in (1, 4, 8):
                _check(weight, w_deq, batch, torch.bfloat16, (STREAM,), f"({out_f}x{in_f}, bs {blocksize})")
    # K = max(2048, blocksize): whole blocks per row (blocksize 4096 needs K >= 4096).
    weight, w_deq = _weight(300, max(2048, blocksize), blocksize, True, quant_type=QuantType.FP4, seed=7)
    _check(weight, w_deq, 2, torch.float16, (STREAM,), f"FP4 bs {blocksize}")


@pytest.mark.cuda
@pytest.mark.parametrize("variant", FORCED)
def test_stream_forced_splits_and_k_slices(variant):
    # Splits with fewer k tiles than warps (idle warps), K slices with a short last slice (7 tiles in
    # 2/4/8 slices), row counts that leave CTAs partly empty.
    for i, (out_f, in_f) in enumerate(((4096, 4096), (1024, 4096), (40, 1792), (129, 256))):
        weight, w_deq = _weight(out_f, in_f, 64, nested=i % 2 == 0, seed=100 + i)
        for batch in (1, 3, 8):
            _check(weight, w_deq, batch, torch.bfloat16, (variant,), f"({out_f}x{in_f})")


@pytest.mark.cuda
def test_stream_row_tiles_per_cta_leave_warps_idle():
    # 28672 rows at split 1: 7 row tiles per CTA (the eighth warp idle) on a 132-SM H200; 28677 rows:
    # a partial last row tile too. The idle warps' zero partial sums must not reach y.
    for out_f in (28672, 28677):
        weight, w_deq = _weight(out_f, 256, 64, nested=True, seed=out_f)
        for batch in (1, 5):
            _check(weight, w_deq, batch, torch.bfloat16, (STREAM, 12), f"({out_f}x256)")


@pytest.mark.cuda
def test_stream_with_bias_like_the_loader():
    weight, w_deq = _weight(4096, 4096, 64, True, seed=3)
    for dtype in (torch.bfloat16, torch.float16):
        _check(weight, w_deq, 1, dtype, (STREAM, MMA), "(4096x4096 + bias)", bias=True)


@pytest.mark.cuda
def test_stream_falls_back_where_its_layout_does_not_hold():
    # blocksize 32, K not a multiple of 256, float32 x, misaligned x: the default kernels run instead.
    for out_f, in_f, bs in ((65, 4096, 32), (65, 4160, 64), (7, 320, 64)):
        weight, w_deq = _weight(out_f, in_f, bs, nested=True, seed=in_f)
        _check(weight, w_deq, 2, torch.bfloat16, (STREAM,), f"fallback ({out_f}x{in_f}, bs {bs})")
    (packed, absmax, args), w_deq = _weight(50, 1024, 64, nested=False, seed=9)
    x = torch.randn(3, 1024, device="cuda")
    ref, bound = dot_bound(x, w_deq, out_dtype=torch.float32, **gemv_arithmetic("cuda", torch.float32))
    assert worst_ratio(_kc().gemv_4bit(x, packed, absmax, variant=STREAM, **args), ref, bound) <= 1.0
    buf = torch.randn(2 * 1024 + 1, dtype=torch.bfloat16, device="cuda")
    xm = buf[1:].view(2, 1024)  # 2-byte offset: not 16-byte aligned
    ref, bound = dot_bound(xm, w_deq, out_dtype=torch.bfloat16, **gemv_arithmetic("cuda", torch.bfloat16))
    assert worst_ratio(_kc().gemv_4bit(xm, packed, absmax, variant=STREAM, **args), ref, bound) <= 1.0


@pytest.mark.cuda
@pytest.mark.parametrize("variant", [STREAM, 17])
def test_stream_is_deterministic(variant):
    (packed, absmax, args), _ = _weight(1024, 4096, 64, nested=True, seed=11)
    x = torch.randn(4, 4096, dtype=torch.bfloat16, device="cuda")
    ys = [_kc().gemv_4bit(x, packed, absmax, variant=variant, **args) for _ in range(5)]
    assert all(torch.equal(ys[0], y) for y in ys[1:])


@pytest.mark.cuda
@pytest.mark.parametrize("variant", [STREAM, 17])
def test_stream_in_a_cuda_graph(variant):
    """Captured (scratch for the K slices from the graph's pool) and replayed on new inputs."""
    (packed, absmax, args), w_deq = _weight(1024, 4096, 64, nested=True, seed=12)
    x = torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _kc().gemv_4bit(x, packed, absmax, variant=variant, **args)  # warm-up, as capture requires
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _kc().gemv_4bit(x, packed, absmax, variant=variant, **args)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        eager = _kc().gemv_4bit(x, packed, absmax, variant=variant, **args)
        assert torch.equal(out, eager)
        ref, bound = dot_bound(x, w_deq, out_dtype=torch.bfloat16, **gemv_arithmetic("cuda", torch.bfloat16))
        assert worst_ratio(out, ref, bound) <= 1.0


@pytest.mark.cuda
def test_stream_scratch_only_for_k_slices():
    kc = _kc()
    bf16 = 2
    assert kc._kernels.cuda_gemv_4bit_scratch(0, bf16, 1, 4096, 4096, 64, 17) == 4 * 4096
    assert kc._kernels.cuda_gemv_4bit_scratch(0, bf16, 2, 4096, 4096, 64, 12) == 0  # split forced: 1 slice
    assert kc._kernels.cuda_gemv_4bit_scratch(0, bf16, 1, 4096, 4096, 64, MMA) == 0
    assert kc._kernels.cuda_gemv_4bit_scratch(0, 0, 1, 4096, 4096, 64, STREAM) == 0  # float32 x


def test_qm_cuda_gemv_env_selects_the_kernel(monkeypatch):
    # No GPU needed: names map to the variant codes of csrc/cuda/qm_cuda.h; a bad name is one line.
    kc = _kc()
    for name, want in (("stream", 11), ("MMA", 20), ("cuda-core", 10), ("auto", 0), ("", 0)):
        monkeypatch.setenv("QM_CUDA_GEMV", name)
        assert kc._gemv_default_variant() == want
    monkeypatch.setenv("QM_CUDA_GEMV", "fastest")
    with pytest.raises(
        ValueError, match="QM_CUDA_GEMV='fastest': expected one of auto, stream, mma, cuda-core"
    ):
        kc._gemv_default_variant()


def test_qm_cuda_gemv_is_read_at_import():
    env = {**os.environ, "QM_CUDA_GEMV": "stream"}
    code = "from converter.kernels import bnb4bit_cuda as k; print(k.GEMV_DEFAULT_VARIANT)"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "11"
