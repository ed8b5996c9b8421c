"""Several weights of one x in one launch (cuda_gemv_4bit_multi: the stream kernel's multi-segment grid).

Each output is held elementwise to the bound its arithmetic gives (tests/error_bounds.py,
``gemv_arithmetic("cuda", 16-bit dtype)``: code values rounded to x's dtype, truncating float32
tensor-core sums over the K terms in any order, including split-warp and K-slice partial sums, and the
rounding to x's dtype) against a float64 reference of the exactly decoded weight. Where the plan does
not depend on the row count (forced split, variants 12..15) every CTA runs the very code of the
one-weight launch, so each output must equal that launch bit for bit; layouts the stream kernel does
not take fall back to one launch per weight, which must equal the one-weight launches too.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
from error_bounds import dot_bound, gemv_arithmetic, worst_ratio

from converter.kernels import bnb4bit as kernels
from converter.kernels import custom_ops  # noqa: F401  (registers torch.ops.quantize_model)
from formats import codebooks
from formats.quant_types import QuantType

STREAM = 11
BF16 = 2  # KERNEL_DTYPE_CODES[torch.bfloat16]


def _kc():
    from converter.kernels import bnb4bit_cuda as kernels_cuda

    return kernels_cuda


@cache  # the kernels never write the weights
def _weight(out_f: int, in_f: int, blocksize: int, nested: bool, quant_type=QuantType.NF4, seed=0):
    """(kernels_cuda.GemvWeight, the float32 decoded weight [out_f, in_f] on the GPU)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) * 0.05
    packed, absmax = kernels.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    qmap = torch.tensor(quant_type.codebook, dtype=torch.float32)
    record = None
    if nested:
        dmap = torch.tensor(codebooks.DYNAMIC8, dtype=torch.float32)
        codes, nabs, off = kernels.quantize_nested(absmax)
        record = kernels.NestedAbsmax(codes.cuda(), nabs.cuda(), off, dmap.cuda())
        absmax = kernels.dequantize_nested(codes, nabs, off, dmap)
    w_deq = kernels.dequantize_4bit(
        packed, absmax, n=w.numel(), blocksize=blocksize, quant_map=qmap, out_dtype=torch.float32
    ).view(out_f, in_f)
    gw = _kc().GemvWeight(packed.cuda(), None if nested else absmax.cuda(), record, qmap.cuda(), out_f)
    return gw, w_deq.cuda()


def _single(x, gw, in_f, blocksize, variant):
    return _kc()._launch_gemv_4bit(
        x, gw.packed, gw.absmax, gw.out_features, in_f, blocksize, gw.quant_map, gw.nested, variant=variant
    )


def _check(weights, x, in_f, blocksize, variant, where):
    """The launch's outputs, each within its derived bound."""
    ys = _kc()._launch_gemv_4bit_multi(x, [gw for gw, _ in weights], in_f, blocksize, variant=variant)
    assert len(ys) == len(weights)
    for i, ((gw, w_deq), y) in enumerate(zip(weights, ys, strict=True)):
        assert y.dtype == x.dtype
        assert y.shape == (x.shape[0], gw.out_features)
        assert y.is_contiguous()
        ref, bound = dot_bound(x, w_deq, out_dtype=x.dtype, **gemv_arithmetic("cuda", x.dtype))
        worst = worst_ratio(y, ref, bound)
        assert worst <= 1.0, f"{where} weight {i}: error {worst:.2f}x the derived bound, B={x.shape[0]}"
    return ys


#: (out_features of each weight, in_features): q/k/v-like, gate/up-like with partial row tiles, single
#: rows and one k tile, four weights with K-slice-friendly thin rows.
SHAPES = (((512, 128, 128), 1024), ((700, 700), 512), ((1, 17, 255), 256), ((64, 16, 16, 33), 4096))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_multi_within_bound_and_equal_to_one_weight_launches(dtype, nested):
    for j, (outs, in_f) in enumerate(SHAPES):
        weights = [_weight(o, in_f, 64, nested, seed=10 * j + i) for i, o in enumerate(outs)]
        for batch in (1, 2, 5, 8):
            x = torch.randn(batch, in_f, dtype=dtype, device="cuda")
            _check(weights, x, in_f, 64, STREAM, f"{outs}x{in_f}")
            for variant in (12, 13, 14, 15):  # forced split: the plan of every weight alone, bit for bit
                ys = _check(weights, x, in_f, 64, variant, f"{outs}x{in_f} variant {variant}")
                for i, ((gw, _), y) in enumerate(zip(weights, ys, strict=True)):
                    assert torch.equal(y, _single(x, gw, in_f, 64, variant)), f"variant {variant} weight {i}"


@pytest.mark.cuda
@pytest.mark.parametrize(
    ("outs", "in_f"), [((4096, 1024, 1024), 4096), ((4096, 512, 512), 2048)], ids=["llama8b", "qwen3moe"]
)
def test_real_qkv_launches_take_full_ctas(outs, in_f):
    """The q/k/v launches of Llama-3.1-8B and Qwen3-30B-A3B: the default plan takes split 4 with two row
    tiles per CTA (variant 14) on a GPU of ~132 multiprocessors, where it took one (half of each CTA's
    warps idle); the split per row tile is the same, so the sums are: within the bound, and equal to
    variant 14's bit for bit on any GPU."""
    weights = [_weight(o, in_f, 64, True, seed=70 + i) for i, o in enumerate(outs)]
    for batch in (1, 4):
        x = torch.randn(batch, in_f, dtype=torch.bfloat16, device="cuda")
        ys = _check(weights, x, in_f, 64, STREAM, f"{outs}x{in_f}")
        forced = _check(weights, x, in_f, 64, 14, f"{outs}x{in_f} variant 14")
        for i, (y, f) in enumerate(zip(ys, forced, strict=True)):
            assert torch.equal(y, f), f"weight {i}, B={batch}"


@pytest.mark.cuda
def test_mixed_weights_in_one_launch():
    """Each weight its own quant map (NF4 / FP4), absmax kind (nested / float32) and blocksize-64 codes."""
    in_f = 2048
    weights = [
        _weight(300, in_f, 128, True, QuantType.NF4, seed=1),
        _weight(40, in_f, 128, False, QuantType.FP4, seed=2),
        _weight(129, in_f, 128, True, QuantType.FP4, seed=3),
    ]
    for batch in (1, 8):
        _check(
            weights, torch.randn(batch, in_f, dtype=torch.bfloat16, device="cuda"), in_f, 128, STREAM, "mixed"
        )


@pytest.mark.cuda
@pytest.mark.parametrize("variant", [STREAM, 16, 17, 18])
def test_k_slices_per_weight(variant):
    """Thin weights (6 row tiles, 64 k tiles): the plan cuts K into slices; every weight's partial sums
    go to its own plane of the scratch buffer and are summed into its own y. (gemv_stream.cu's plan():
    6 row tiles take the 8-warp split, and K slices need k_tiles >= 2 * split * slices * 2, so K = 4096
    (16 tiles) would take none; 16384 takes 4.)"""
    in_f, outs = 16384, (64, 16, 16)
    rows = sum(outs)
    if variant == STREAM:  # the automatic plan takes K slices here (a few CTAs on 100+ multiprocessors)
        assert _kc()._kernels.cuda_gemv_4bit_multi_scratch(0, BF16, 1, rows, in_f, 64, STREAM) > 0
    weights = [_weight(o, in_f, 64, i != 1, seed=40 + i) for i, o in enumerate(outs)]
    for batch in (1, 3, 8):
        x = torch.randn(batch, in_f, dtype=torch.bfloat16, device="cuda")
        _check(weights, x, in_f, 64, variant, f"K slices, variant {variant}")


@pytest.mark.cuda
def test_layouts_the_stream_kernel_does_not_take_fall_back_per_weight():
    # float32 x; K not a multiple of 256; blocksize 32; x not 16-byte aligned: one launch per weight,
    # each the kernel gemv_4bit picks for it, so the same bits as the one-weight launches.
    cases = []
    for in_f, bs in ((1024, 64), (320, 64), (1024, 32)):
        ws = [_weight(o, in_f, bs, True, seed=50 + o) for o in (48, 20)]
        cases.append((ws, torch.randn(3, in_f, dtype=torch.bfloat16, device="cuda"), in_f, bs))
    ws = [_weight(o, 1024, 64, False, seed=60 + o) for o in (48, 20)]
    cases.append((ws, torch.randn(2, 1024, device="cuda"), 1024, 64))  # float32 x
    buf = torch.randn(2 * 1024 + 1, dtype=torch.bfloat16, device="cuda")
    cases.append((ws, buf[1:].view(2, 1024), 1024, 64))  # 2-byte offset
    for ws, x, in_f, bs in cases:
        ys = _check(ws, x, in_f, bs, 0, f"fallback K={in_f} bs={bs} {x.dtype}")
        for (gw, _), y in zip(ws, ys, strict=True):
            assert torch.equal(y, _single(x, gw, in_f, bs, 0))


@pytest.mark.cuda
def test_multi_in_a_cuda_graph():
    """Captured (scratch for the K slices from the graph's pool) and replayed on new inputs."""
    in_f, outs = 4096, (64, 16, 16)
    weights = [_weight(o, in_f, 64, True, seed=70 + o) for o in outs]
    gws = [gw for gw, _ in weights]
    x = torch.randn(1, in_f, dtype=torch.bfloat16, device="cuda")
    launch = lambda: _kc()._launch_gemv_4bit_multi(x, gws, in_f, 64)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        launch()  # warm-up, as capture requires
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs_g = launch()
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        for y_g, y in zip(outs_g, launch(), strict=True):
            assert torch.equal(y_g, y)
        _check(weights, x, in_f, 64, STREAM, "graph replay")


@pytest.mark.cuda
def test_custom_op_on_cuda_equals_the_launch():
    in_f = 1024
    weights = [_weight(o, in_f, 64, n, seed=80 + o) for o, n in ((256, True), (64, False))]
    x = torch.randn(4, in_f, dtype=torch.bfloat16, device="cuda")
    lists = [[], [], [], [], [], [], []]
    for gw, _ in weights:
        nst = gw.nested
        for k, v in enumerate(
            (
                gw.packed,
                gw.absmax,
                nst and nst.codes,
                nst and nst.nested_absmax,
                nst and nst.nested_map,
                nst.offset if nst else 0.0,
                gw.quant_map,
            )
        ):
            lists[k].append(v)
    ys = torch.ops.quantize_model.gemv_4bit_multi(x, *lists, [256, 64], 64)
    for y, want in zip(
        ys, _kc()._launch_gemv_4bit_multi(x, [gw for gw, _ in weights], in_f, 64), strict=True
    ):
        assert torch.equal(y, want)
