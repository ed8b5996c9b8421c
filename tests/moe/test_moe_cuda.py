"""MoE experts on CUDA: the grouped GEMV / grouped dequantize kernels (csrc/cuda/gemv_grouped.cu), the
experts module's decode and prefill, CUDA-graph capture and torch.compile.

Needs an NVIDIA GPU and the CUDA backend (skipped otherwise).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from error_bounds import U32, dot_bound, gemv_arithmetic, worst_ratio
from moe_helpers import (
    CUDA_SILU_U,
    assert_cuda_graph_replays_like_eager,
    experts_reference_and_bound,
    grouped_cuda_decode,
)

from converter.kernels import bnb4bit as kernels
from converter.loader import moe as moe_loader
from converter.loader import moe_cuda
from converter.loader.model import load_quantized
from converter.loader.moe import QuantExperts4bit, moe_modules
from formats.codebooks import NF4
from formats.quant_types import QuantType

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not moe_cuda.available(), reason="no CUDA device / CUDA MoE kernels"
    ),
]


def _experts(num: int, out_f: int, in_f: int, bs: int, pad_bytes: int, pad_blocks: int, seed: int = 0):
    """A layer-like buffer: per expert a pad region (as gate_up sits before down), then one [out, in]
    weight. Returns (packed, absmax, quant_map, decoded float32 weights [num, out, in]) on the CPU."""
    g = torch.Generator().manual_seed(seed)
    packed = torch.zeros(num, pad_bytes + out_f * in_f // 2, dtype=torch.uint8)
    absmax = torch.zeros(num, pad_blocks + out_f * in_f // bs)
    qmap = torch.tensor(NF4, dtype=torch.float32)
    decoded = []
    for e in range(num):
        p, a = kernels.quantize_4bit(
            torch.randn(out_f, in_f, generator=g) * 0.05, blocksize=bs, quant_type=QuantType.NF4
        )
        packed[e, pad_bytes:], absmax[e, pad_blocks:] = p, a
        w = kernels.dequantize_4bit(
            p, a, n=out_f * in_f, blocksize=bs, quant_map=qmap, out_dtype=torch.float32
        )
        decoded.append(w.view(out_f, in_f))
    return packed, absmax, qmap, torch.stack(decoded)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("out_f", "in_f", "bs", "tokens", "k"),
    [
        (1536, 2048, 64, 1, 8),
        (2048, 768, 64, 1, 8),
        (96, 128, 64, 3, 2),
        (33, 4096, 256, 2, 3),
        (40, 96, 32, 8, 1),
    ],
)
def test_grouped_gemv_within_derived_bound(dtype, out_f, in_f, bs, tokens, k):
    """Every (token, slot) row against the float64 product with its expert's decoded weight; the bound
    is the CPU grouped kernel's arithmetic (block sums of quant_map[q] * x scaled by absmax: 2^-24 per
    weight, float32 FMA accumulation in any order: gamma_K, one rounding to x's dtype). The CPU grouped
    kernel meets the same bound on the same rows."""
    experts, pad_bytes, pad_blocks = 6, 48, 3
    packed, absmax, qmap, w = _experts(experts, out_f, in_f, bs, pad_bytes, pad_blocks, seed=out_f)
    g = torch.Generator().manual_seed(in_f)
    ids = torch.randint(0, experts, (tokens * k,), generator=g)
    x = torch.randn(tokens, in_f, generator=g).to(dtype)
    args = dict(
        byte_offset=pad_bytes, block_offset=pad_blocks, out_features=out_f, in_features=in_f, blocksize=bs
    )
    y = moe_cuda.grouped_gemv(
        x.cuda(), ids.cuda(), packed.cuda(), absmax.cuda(), qmap.cuda(), x_share=k, **args
    ).cpu()
    y_cpu = moe_loader._grouped_gemv_rows(x, ids, packed, absmax, qmap, x_share=k, **args)
    assert y.dtype == dtype
    assert y.shape == (tokens * k, out_f)
    for row, e in enumerate(ids.tolist()):
        ref, bound = dot_bound(
            x[row // k : row // k + 1], w[e], out_dtype=dtype, **gemv_arithmetic("cpu", dtype)
        )
        for name, got in (("cuda", y), ("cpu", y_cpu)):
            worst = worst_ratio(got[row : row + 1], ref, bound)
            assert worst <= 1.0, f"{name} row {row} (expert {e}): {worst:.2f}x the derived bound"


def test_grouped_gemv_unknown_expert_gives_nan_rows():
    """The ids never reach the host: an id outside the layer's experts cannot raise, it poisons its row."""
    packed, absmax, qmap, _ = _experts(3, 64, 128, 64, 0, 0)
    ids = torch.tensor([0, 7, 2, -1], device="cuda")
    x = torch.randn(4, 128, dtype=torch.bfloat16, device="cuda")
    y = moe_cuda.grouped_gemv(
        x, ids, packed.cuda(), absmax.cuda(), qmap.cuda(), x_share=1, byte_offset=0, block_offset=0,
        out_features=64, in_features=128, blocksize=64,
    ).cpu()  # fmt: skip
    assert torch.isnan(y[[1, 3]]).all()
    assert torch.isfinite(y[[0, 2]]).all()


#: (in_features, blocksize) that take each lane configuration of csrc/cuda/gemv_grouped.cu by default:
#: chunks of 32 weights K / 32 = 3 (8 lanes x 1), 24 (8 x 3), 44 (16 x 3, lanes 12..15 one chunk short),
#: 64 (16 x 4), 130 (32 x 4, a second round of 2 chunks), 256 (32 x 4, two full rounds).
LANE_SHAPES = [(96, 32), (768, 64), (1408, 64), (2048, 64), (4160, 64), (8192, 256)]


@pytest.mark.parametrize("lanes", [0, 8, 16, 32])
@pytest.mark.parametrize(("in_f", "bs"), LANE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grouped_gemv_lane_configs_within_derived_bound(dtype, in_f, bs, lanes):
    """Every lane configuration (chosen by K, or forced: a K not a multiple of lanes x chunks leaves lanes
    idle or a round short) against the float64 product, within the same derived bound as the default
    (any summation order: gamma_K); two calls give the same bits (fixed order, no atomics)."""
    experts, out_f, tokens, k = 5, 40, 3, 2
    packed, absmax, qmap, w = _experts(experts, out_f, in_f, bs, 32, 1, seed=in_f + lanes)
    g = torch.Generator().manual_seed(bs)
    ids = torch.randint(0, experts, (tokens * k,), generator=g)
    x = torch.randn(tokens, in_f, generator=g).to(dtype)
    args = dict(
        byte_offset=32, block_offset=1, out_features=out_f, in_features=in_f, blocksize=bs, lanes=lanes
    )
    dev = [t.cuda() for t in (x, ids, packed, absmax, qmap)]
    y = moe_cuda.grouped_gemv(*dev, x_share=k, **args)
    assert torch.equal(y, moe_cuda.grouped_gemv(*dev, x_share=k, **args))
    for row, e in enumerate(ids.tolist()):
        ref, bound = dot_bound(
            x[row // k : row // k + 1], w[e], out_dtype=dtype, **gemv_arithmetic("cpu", dtype)
        )
        worst = worst_ratio(y[row : row + 1].cpu(), ref, bound)
        assert worst <= 1.0, f"row {row} (expert {e}): {worst:.2f}x the derived bound"


def test_grouped_gemv_rejects_other_lane_counts():
    """lanes is 0 (by K), 8, 16 or 32; the routing sum also needs k <= 256 / lanes slots per CTA."""
    packed, absmax, qmap, _ = _experts(2, 16, 64, 64, 0, 0)
    x = torch.randn(1, 64, device="cuda")
    with pytest.raises(ValueError, match="cuda_gemv_4bit_grouped"):
        moe_cuda.grouped_gemv(
            x, torch.zeros(1, dtype=torch.int64, device="cuda"), packed.cuda(), absmax.cuda(), qmap.cuda(),
            x_share=1, byte_offset=0, block_offset=0, out_features=16, in_features=64, blocksize=64, lanes=12,
        )  # fmt: skip
    layer = _layer(10, 64, 32, 32, seed=0)
    x, idx, w = _decode_routing(layer, 1, 9, torch.float32, seed=0)
    with pytest.raises(ValueError, match="cuda_gemv_4bit_grouped_sum"):
        moe_cuda.decode_silu(x, idx, w, *layer.buffers, lanes=32)


class _Layer:
    """A synthetic MoE layer in the loader's layout (expert e: gate rows, up rows, then down, in one row
    of packed / absmax) with its decoded float32 weights; the attributes experts_reference_and_bound
    reads of a QuantExperts4bit."""

    def __init__(self, num: int, hidden: int, inter: int, bs: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        gu_n, dn_n = 2 * inter * hidden, hidden * inter
        self.hidden_dim, self.intermediate_dim, self.num_experts, self.bs = hidden, inter, num, bs
        self.qmap = torch.tensor(NF4, dtype=torch.float32)
        packed = torch.zeros(num, (gu_n + dn_n) // 2, dtype=torch.uint8)
        absmax = torch.zeros(num, (gu_n + dn_n) // bs)
        self.gate_up, self.down = [], []
        for e in range(num):
            for byte0, block0, shape, out in (
                (0, 0, (2 * inter, hidden), self.gate_up),
                (gu_n // 2, gu_n // bs, (hidden, inter), self.down),
            ):
                p, a = kernels.quantize_4bit(
                    torch.randn(*shape, generator=g) * 0.05, blocksize=bs, quant_type=QuantType.NF4
                )
                packed[e, byte0 : byte0 + p.numel()] = p.reshape(-1)
                absmax[e, block0 : block0 + a.numel()] = a.reshape(-1)
                n = shape[0] * shape[1]
                w = kernels.dequantize_4bit(
                    p, a, n=n, blocksize=bs, quant_map=self.qmap, out_dtype=torch.float32
                )
                out.append(w.view(shape))
        self.buffers = (packed.cuda(), absmax.cuda(), self.qmap.cuda(), inter, bs)

    def expert_weights(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_up[e].to(dtype), self.down[e].to(dtype)


_LAYERS: dict[tuple[int, int, int, int], _Layer] = {}


def _layer(num: int, hidden: int, inter: int, bs: int, seed: int = 0) -> _Layer:
    key = (num, hidden, inter, bs)
    if key not in _LAYERS:  # quantized once per session: the large shape takes a few seconds on the CPU
        _LAYERS[key] = _Layer(num, hidden, inter, bs, seed)
    return _LAYERS[key]


def _decode_routing(layer: _Layer, tokens: int, k: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, layer.hidden_dim, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(layer.num_experts, generator=g)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=g).to(dtype)
    return x.cuda(), idx.cuda(), w.cuda()


def _decode_arithmetic(dtype: torch.dtype, lanes: int) -> dict[str, float]:
    """experts_reference_and_bound's weight_rel / acc_u for decode_silu: the CUDA-core kernels (forced
    lanes, or float32 x) use the decoded weights exactly and float32 FMAs; for 16-bit x, lanes 0 may take
    the tensor-core kernels (code values rounded to x's dtype, truncating float32 accumulators), whose
    bound gemv_arithmetic gives and which covers both."""
    if lanes in (0, moe_cuda.MMA_LANES) and dtype != torch.float32:
        return gemv_arithmetic("cuda", dtype)
    return {"weight_rel": 0.0, "acc_u": U32}


@pytest.mark.parametrize("lanes", [0, moe_cuda.MMA_LANES, 8, 16, 32])
@pytest.mark.parametrize("tokens", [1, 4, 8])
@pytest.mark.parametrize(
    ("hidden", "inter", "bs", "dtype", "k"),
    [
        (2048, 768, 64, torch.bfloat16, 8),
        (256, 512, 128, torch.float16, 3),
        (160, 96, 32, torch.float32, 8),
        (1408, 64, 64, torch.float32, 8),
    ],
    ids=["qwen3-30b-a3b-bf16", "k3-f16", "small-f32", "k44-f32"],
)
def test_fused_decode_lane_configs_within_derived_bound(hidden, inter, bs, dtype, k, tokens, lanes):
    """The two fused decode launches (gate/up + SiLU, then down + routing sum) at Qwen3-30B-A3B's shape
    (hidden 2048, expert intermediate 768, top-8 of 10 experts here), at a top-3 shape (the tensor-core
    routing sum with 3 and 6 warps a row tile), and at shapes whose K leaves lanes or chunks idle, 1..8
    tokens, each kernel configuration: within the derived bound of the exact result (the module test's
    steps: dots in any order, silu, one rounding of h and of y to the dtype); deterministic run to run.
    The tensor-core kernels refuse float32 x and K not a multiple of 256."""
    layer = _layer(10, hidden, inter, bs)
    x, idx, w = _decode_routing(layer, tokens, k, dtype, seed=tokens + lanes)
    if lanes == moe_cuda.MMA_LANES and (dtype == torch.float32 or hidden % 256 or inter % 256):
        with pytest.raises(ValueError, match="cuda_gemv_4bit_grouped_glu"):
            moe_cuda.decode_silu(x, idx, w, *layer.buffers, lanes=lanes)
        return
    got = moe_cuda.decode_silu(x, idx, w, *layer.buffers, lanes=lanes)
    assert torch.equal(got, moe_cuda.decode_silu(x, idx, w, *layer.buffers, lanes=lanes))
    u16 = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps / 2
    ref, bound = experts_reference_and_bound(
        layer, x, idx, w, silu_u=CUDA_SILU_U, h_u=U32 + u16 + U32 * u16, out_u=u16,
        **_decode_arithmetic(dtype, lanes),
    )  # fmt: skip
    assert ((got.double().cpu() - ref).abs() <= bound).all()


def test_fused_decode_takes_tensor_cores_by_default_for_16bit_x():
    """lanes 0 at Qwen3-30B-A3B's bf16 shape is the tensor-core path (not silently the CUDA-core one):
    it equals the forced MMA_LANES output bit for bit and differs from the CUDA-core output."""
    layer = _layer(10, 2048, 768, 64)
    x, idx, w = _decode_routing(layer, 2, 8, torch.bfloat16, seed=7)
    auto = moe_cuda.decode_silu(x, idx, w, *layer.buffers)
    assert torch.equal(auto, moe_cuda.decode_silu(x, idx, w, *layer.buffers, lanes=moe_cuda.MMA_LANES))
    assert not torch.equal(auto, moe_cuda.decode_silu(x, idx, w, *layer.buffers, lanes=16))


def test_fused_decode_tensor_cores_refuse_more_than_eight_experts():
    """The tensor-core routing sum gives each of a token's k experts a warp of the CTA: k <= 8."""
    layer = _layer(10, 256, 256, 64)
    x, idx, w = _decode_routing(layer, 1, 9, torch.bfloat16, seed=3)
    with pytest.raises(ValueError, match="cuda_gemv_4bit_grouped_sum"):
        moe_cuda.decode_silu(x, idx, w, *layer.buffers, lanes=moe_cuda.MMA_LANES)
    got = moe_cuda.decode_silu(x, idx, w, *layer.buffers)  # lanes 0: the CUDA-core kernels take k = 9
    u16 = torch.finfo(torch.bfloat16).eps / 2
    ref, bound = experts_reference_and_bound(
        layer, x, idx, w, silu_u=CUDA_SILU_U, h_u=U32 + u16 + U32 * u16, out_u=u16
    )
    assert ((got.double().cpu() - ref).abs() <= bound).all()


@pytest.mark.parametrize(
    ("hidden", "inter", "bs", "dtype", "lanes"),
    [(160, 96, 32, torch.float32, 0), (256, 256, 64, torch.bfloat16, moe_cuda.MMA_LANES)],
    ids=["cuda-cores", "tensor-cores"],
)
def test_fused_decode_unknown_expert_poisons_its_token(hidden, inter, bs, dtype, lanes):
    """An id outside the layer's experts (the ids never reach the host) gives NaN for its token's whole
    output row, in both launches; the other tokens are unaffected (equal to a call without that token)."""
    layer = _layer(10, hidden, inter, bs)
    x, idx, w = _decode_routing(layer, 3, 8, dtype, seed=5)
    bad = idx.clone()
    bad[1, 3] = 10
    bad[2, 0] = -1
    got = moe_cuda.decode_silu(x, bad, w, *layer.buffers, lanes=lanes)
    assert torch.isnan(got[1:]).all()
    assert torch.equal(got[0], moe_cuda.decode_silu(x[:1], idx[:1], w[:1], *layer.buffers, lanes=lanes)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_grouped_dequantize_equals_dequantize_4bit(dtype):
    """Bit-identical to dequantize_4bit of each listed expert's region (same decode, one rounding)."""
    pad_bytes, pad_blocks, out_f, in_f, bs = 64, 2, 48, 256, 64
    packed, absmax, qmap, _ = _experts(5, out_f, in_f, bs, pad_bytes, pad_blocks)
    ids = torch.tensor([4, 1, 1, 3])
    got = moe_cuda.grouped_dequantize(
        ids.cuda(), packed.cuda(), absmax.cuda(), qmap.cuda(), byte_offset=pad_bytes, block_offset=pad_blocks,
        n=out_f * in_f, blocksize=bs, dtype=dtype,
    ).cpu()  # fmt: skip
    for i, e in enumerate(ids.tolist()):
        ref = kernels.dequantize_4bit(
            packed[e, pad_bytes:].contiguous(), absmax[e, pad_blocks:].contiguous(), n=out_f * in_f,
            blocksize=bs, quant_map=qmap, out_dtype=dtype,
        )  # fmt: skip
        assert torch.equal(got[i], ref), i


def test_grouped_matmul_within_derived_bound():
    """Prefill's grouped matmul (torch's grouped_mm for bf16 on sm80+, else one F.linear per expert):
    each expert's rows against float64, bf16 inputs exact, tensor-core float32 accumulators that may
    truncate instead of rounding (unit roundoff 2^-23: gamma_K), one rounding to bf16."""
    g = torch.Generator().manual_seed(1)
    counts = [3, 1, 8, 5]
    x = torch.randn(sum(counts), 256, generator=g).to(torch.bfloat16).cuda()
    w = (torch.randn(len(counts), 96, 256, generator=g) * 0.05).to(torch.bfloat16).cuda()
    y = moe_cuda._linear_sorted(x, w, counts)
    start = 0
    for i, n in enumerate(counts):
        ref, bound = dot_bound(x[start : start + n], w[i], out_dtype=torch.bfloat16, acc_u=2 * U32)
        assert worst_ratio(y[start : start + n], ref, bound) <= 1.0, i
        start += n


def _cuda_experts(folders) -> QuantExperts4bit:
    q, _ = folders("qwen3_moe")
    return next(iter(moe_modules(load_quantized(q, device="cuda")).values()))


def _routing(m: QuantExperts4bit, tokens: int, k: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, m.hidden_dim, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(m.num_experts, generator=g)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=g).to(dtype)
    return x.cuda(), idx.cuda(), w.cuda()


@pytest.mark.parametrize("tokens", [1, 3, 8, 12, 40])
def test_module_within_derived_bound(folders, tokens):
    """float32 compute on CUDA: decode (<= 8 tokens: the fused grouped GEMVs) and prefill (sorted by
    expert, grouped dequantize, one matmul per hit expert) within the derived float32 bound of the
    exact result."""
    m = _cuda_experts(folders)
    m.compute_dtype = torch.float32
    assert m.packed.is_cuda
    x, idx, w = _routing(m, tokens, 2, tokens)
    with torch.no_grad():
        got = m(x, idx, w).double().cpu()
    ref, bound = experts_reference_and_bound(m, x, idx, w, silu_u=CUDA_SILU_U)
    assert ((got - ref).abs() <= bound).all()


@pytest.mark.parametrize("tokens", [3, 12])
def test_own_gate_module_within_derived_bound(folders, tokens):
    """Experts with their class's own clamped SwiGLU (DeepSeek-V4) on CUDA, float32 compute (decode: the
    two grouped GEMVs with the gate between them; prefill: the per-expert loop, the CUDA GEMV or
    dequantize + matmul), within the derived float32 bound that
    follows their gate (moe_helpers.experts_gate), torch's CUDA silu allowed CUDA_SILU_U."""
    pytest.importorskip("transformers.models.deepseek_v4")
    q, _ = folders("deepseek_v4_i64")
    m = next(iter(moe_modules(load_quantized(q, device="cuda")).values()))
    m.compute_dtype = torch.float32
    x, idx, w = _routing(m, tokens, 2, tokens)
    with torch.no_grad():
        got = m(x, idx, w).double().cpu()
    ref, bound = experts_reference_and_bound(m, x, idx, w, silu_u=CUDA_SILU_U)
    assert ((got - ref).abs() <= bound).all()


@pytest.mark.parametrize("tokens", [3, 8, 12, 40])
def test_a_token_routed_twice_to_one_expert_counts_both_slots(folders, tokens):
    """A token whose top-k names one expert in two slots (a custom router) gets it once per slot, as
    transformers' experts loop adds every (token, slot) pair: decode (fused grouped GEMVs) and prefill
    (sorted by expert) within the derived float32 bound of the exact result with both slots counted."""
    m = _cuda_experts(folders)
    m.compute_dtype = torch.float32
    x, idx, w = _routing(m, tokens, 2, 7 + tokens)
    idx[0], idx[2] = torch.tensor([1, 1]), torch.tensor([3, 3])
    with torch.no_grad():
        got = m(x, idx, w).double().cpu()
    ref, bound = experts_reference_and_bound(m, x, idx, w, silu_u=CUDA_SILU_U)
    assert ((got - ref).abs() <= bound).all()


@pytest.mark.parametrize("tokens", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_decode_16bit_within_derived_bound(folders, tokens, dtype):
    """16-bit decode (the fused path: float32 inside each kernel): h = silu(g) * up is rounded once to the
    16-bit dtype after its float32 product (u + u16 + u u16), the weighted sum once at the end (u16);
    x and the routing weights are 16-bit values used exactly."""
    m = _cuda_experts(folders)
    m.compute_dtype = dtype  # x used as given (a bf16 compute dtype would round an fp16 x)
    x, idx, w = _routing(m, tokens, 2, 100 + tokens, dtype)
    with torch.no_grad():
        got = m(x, idx, w)
    assert got.dtype == dtype
    u16 = torch.finfo(dtype).eps / 2
    ref, bound = experts_reference_and_bound(
        m, x, idx, w, silu_u=CUDA_SILU_U, h_u=U32 + u16 + U32 * u16, out_u=u16
    )
    assert ((got.double().cpu() - ref).abs() <= bound).all()


@pytest.mark.parametrize("tokens", [12, 40])
def test_bf16_prefill_within_derived_bound(folders, tokens):
    """bf16 prefill (sorted by expert, grouped dequantize, grouped matmul): weights dequantized to bf16
    (u16 each), tensor-core float32 accumulation (2^-23: gamma_K), every intermediate rounded to bf16 as
    torch's bf16 ops round it (gate/up, silu on top of its float32 evaluation, h, the down output, the
    routing product), the k slots summed in float32, one final rounding to bf16."""
    m = _cuda_experts(folders)
    m.compute_dtype = torch.bfloat16
    x, idx, w = _routing(m, tokens, 2, 200 + tokens, torch.bfloat16)
    with torch.no_grad():
        got = m(x, idx, w)
    u16 = torch.finfo(torch.bfloat16).eps / 2
    ref, bound = experts_reference_and_bound(
        m, x, idx, w, weight_rel=u16, acc_u=2 * U32, pre_u=u16, silu_u=4 * U32 + u16 + 4 * U32 * u16,
        h_u=u16, y_u=u16, wy_u=u16, out_u=u16,
    )  # fmt: skip
    assert ((got.double().cpu() - ref).abs() <= bound).all()


def test_decode_in_a_cuda_graph_follows_new_routing(folders):
    """Captured once, replayed with other tokens and other experts: the kernel reads the ids on the
    device, so each replay equals an eager call with that routing, bit for bit."""
    m = _cuda_experts(folders)
    assert_cuda_graph_replays_like_eager(m, lambda seed: _routing(m, 2, 2, seed, torch.bfloat16))


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from converter.loader.model import load_quantized
    from converter.loader.moe import moe_modules
    m = next(iter(moe_modules(load_quantized(sys.argv[1], device="cuda")).values()))
    g = torch.Generator().manual_seed(0)
    for mode in ("default", "reduce-overhead"):
        compiled = torch.compile(m, fullgraph=True, mode=mode)
        for tokens in (1, 3):
            x = torch.randn(tokens, m.hidden_dim, generator=g).to(torch.bfloat16).cuda()
            idx = torch.stack([torch.randperm(m.num_experts, generator=g)[:2] for _ in range(tokens)]).cuda()
            w = torch.rand(tokens, 2, generator=g).to(torch.bfloat16).cuda()
            with torch.no_grad():
                eager = m(x, idx, w)
                for _ in range(3):  # warm-up, record, replay (reduce-overhead)
                    got = compiled(x, idx, w).clone()
            assert torch.equal(got, eager), (mode, tokens)
    print("ok")
    """
)


def test_torch_compile_fullgraph_and_reduce_overhead(folders):
    """The experts forward is one custom op whose CUDA kernel never syncs: fullgraph compiles, inductor
    and CUDA-graph replays give the eager bits. A subprocess, because `make test` disables dynamo."""
    q, _ = folders("qwen3_moe")
    env = {k: v for k, v in os.environ.items() if k != "TORCHDYNAMO_DISABLE"}
    r = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, str(q)], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("ok")


def test_model_generates_on_cuda(folders):
    """Whole model on the GPU (grouped prefill, then grouped-GEMV decode steps): runs end to end and
    gives valid ids of the asked length."""
    q, _ = folders("qwen3_moe")
    ids = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64, 11, 90, 3, 45]], device="cuda")
    fast = load_quantized(q, device="cuda")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = fast.generate(ids, **kw)
    assert out.shape == (1, ids.shape[1] + 6)
    assert int(out.max()) < fast.config.vocab_size


def test_loaded_on_the_gpu_saves_the_source_records(folders, tmp_path):
    """device="cuda": the experts' codes and absmax are on the GPU (stacked there directly), the nested
    codes kept for saving on the host; save_pretrained writes the source folder's expert tensors."""
    from safetensors.torch import load_file

    q, _ = folders("qwen3_moe")
    model = load_quantized(q, device="cuda")
    for m in moe_modules(model).values():
        assert m.packed.is_cuda
        assert m.absmax.is_cuda
        assert all(t.device.type == "cpu" for t in m.nested_buffers().values())
    model.save_pretrained(tmp_path / "saved")
    src, saved = {}, {}
    for folder, tensors in ((q, src), (tmp_path / "saved", saved)):
        for f in sorted(folder.glob("*.safetensors")):
            tensors.update(load_file(f))
    experts = [k for k in src if ".experts." in k]
    assert experts
    assert all(torch.equal(saved[k], src[k]) for k in experts)


@pytest.mark.skipif(not hasattr(transformers, "DeepseekV4ForCausalLM"), reason="no DeepSeek-V4")
def test_own_gate_decode_is_grouped_without_host_sync_and_replays_in_a_cuda_graph(folders, monkeypatch):
    """DeepSeek-V4's experts (their class's own clamped SwiGLU) decode on CUDA through the two grouped
    GEMV launches with their gate between them, as gpt-oss' do, instead of the per-expert loop (a GEMV
    per hit expert and projection, host syncs to find the hit experts): no per-expert loop, no host
    synchronisation, a CUDA-graph replay with other routing equals an eager call bit for bit, and the
    model generates on the GPU."""
    q, _ = folders("deepseek_v4_i64")
    model = load_quantized(q, device="cuda")
    m = next(iter(moe_modules(model).values()))
    assert m.apply_gate is not None
    x, idx, w = _routing(m, 3, 2, 0, torch.bfloat16)
    _, launches = grouped_cuda_decode(m, x, idx, w, monkeypatch)
    assert launches == [2 * m.intermediate_dim, m.hidden_dim]
    assert_cuda_graph_replays_like_eager(m, lambda seed: _routing(m, 2, 2, seed, torch.bfloat16))
    out = model.generate(torch.tensor([[1, 5, 9, 33]], device="cuda"), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)
