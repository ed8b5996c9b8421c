"""load_quantized on --moe-experts quantize folders: 4-bit experts, logits, GEMV bound, generate, compile."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from moe_helpers import (
    FAMILIES,
    FAMILIES_5_25,
    MOE,
    assert_float32_experts_within_bound,
    down_code_step_ratios,
    load_bf16_eager,
    longcat_zero_rows,
    make_longcat_flash,
    make_moe,
    random_routes,
)
from tiny_models import load_logged

from converter.loader.model import linear4bit_modules, load_quantized
from converter.loader.module import QuantLinear4bit
from converter.loader.moe import QuantExperts4bit, moe_modules
from converter.writer.pipeline import convert

IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64, 11, 90, 3, 45]])


def _dequant_paths(model: torch.nn.Module) -> torch.nn.Module:
    for layer in linear4bit_modules(model).values():
        layer.use_gemv = False
    for experts in moe_modules(model).values():
        experts.use_gemv = False
    return model


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _repeated_routes(tokens: int, num_experts: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-2 routes of ``tokens`` tokens where tokens 0 and 2 have the same expert in both slots (a custom
    router, or top-k past the experts with nonzero weight), and their routing weights."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(num_experts, generator=g)[:2] for _ in range(tokens)])
    idx[0], idx[2] = torch.tensor([1, 1]), torch.tensor([3, 3])
    return idx, torch.rand(tokens, 2, generator=g)


@pytest.mark.parametrize("tokens", [3, 12], ids=["decode", "prefill"])
def test_a_token_routed_twice_to_one_expert_counts_both_slots(folders, tokens):
    """transformers' experts loop adds every (token, slot) pair (index_add_), so a token whose top-k holds
    one expert twice gets that expert's output with both weights. Our per-expert loop (prefill on the CPU,
    use_gemv = False) wrote ``out[token_idx] = out[token_idx] + y``, where a repeated token keeps one
    of its slots: it now equals transformers' experts module on the decoded weights bit for bit; and
    the default path (grouped GEMV for decode, per-expert GEMV in prefill) stays within the derived
    float32 bound of the exact result, both slots counted."""
    from moe_helpers import experts_reference_and_bound

    q, plain = folders("qwen3_moe")
    ours = next(iter(moe_modules(load_quantized(q)).values()))
    theirs = load_bf16_eager(plain).model.layers[0].mlp.experts
    idx, w = _repeated_routes(tokens, ours.num_experts, tokens)
    x = torch.randn(tokens, ours.hidden_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours.use_gemv = False
        assert torch.equal(ours(x.bfloat16(), idx, w.bfloat16()), theirs(x.bfloat16(), idx, w.bfloat16()))
        ours.use_gemv, ours.compute_dtype = True, torch.float32
        got = ours(x, idx, w).double()
    ref, bound = experts_reference_and_bound(ours, x, idx, w)
    assert ((got - ref).abs() <= bound).all()
    once = ref[0] - w[0, 0].double() * (ref[0] / w[0].sum().double())  # token 0 with one slot only
    assert (got[0] - once).abs().max() > 100 * bound[0].max()


def _assert_dequant_path_bit_identical(folders, name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Our model of ``name``'s 4-bit folder on the dequantize path (every experts module ours) and the
    dequantized folder in transformers' eager experts: their logits are equal bit for bit (prefill: 12
    tokens; decode: 1 token). Returns (ours, reference)."""
    q, plain = folders(name)
    ours = _dequant_paths(load_quantized(q))
    mods = moe_modules(ours)
    assert mods
    assert all(isinstance(m, QuantExperts4bit) for m in mods.values())
    ref = load_bf16_eager(plain)
    assert torch.equal(_logits(ours), _logits(ref))
    assert torch.equal(_logits(ours, IDS[:, :1]), _logits(ref, IDS[:, :1]))
    return ours, ref


@pytest.mark.parametrize("name", [*FAMILIES, "qwen3_moe_i32"])
def test_logits_bit_identical_to_dequantized_model(folders, name):
    """On the dequantize path our loader computes transformers' eager experts loop with the decoded
    weights, so its logits equal those of the dequantized bf16 folder loaded by transformers, bit for bit
    (prefill: 12 tokens; decode: 1 token)."""
    _assert_dequant_path_bit_identical(folders, name)


@pytest.mark.parametrize("name", FAMILIES_5_25)
def test_families_new_in_transformers_5_25_match_their_dequantized_folder(folders, name):
    """MiniCPM-5-MoE (refused by convert before), Kolibri-1.1 and Param2-MoE (transformers 5.25; skipped
    before) with 4-bit experts: on the dequantize path the logits equal those of the dequantized folder in
    transformers bit for bit (prefill and decode), and so does greedy generate; the default (GEMV) path
    generates as many valid tokens."""
    ours, ref = _assert_dequant_path_bit_identical(folders, name)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ref.generate(IDS[:, :4], **kw)
        assert torch.equal(ours.generate(IDS[:, :4], **kw), expected)
        fast = load_quantized(folders(name)[0]).generate(IDS[:, :4], **kw)
    assert fast.shape == expected.shape
    assert int(fast.max()) < ref.config.vocab_size


@pytest.mark.parametrize(
    ("family", "cls"), [("minimax_m3_vl_text", "MiniMaxM3VLForCausalLM"), ("hy_v4", "HYV4ForCausalLM")]
)
def test_experts_with_their_own_gate_and_no_act_fn_load(folders, family, cls):
    """MiniMax-M3-VL's and HY-V4's experts gate with their class's own clamped SwiGLU (_apply_gate) and
    have no ``act_fn``: loading a --moe-experts quantize folder failed with "'MiniMaxM3VLExperts' object
    has no attribute 'act_fn'" (HYV4Experts likewise). It loads and runs the module's gate: on the
    dequantize path the logits equal those of the dequantized folder loaded by transformers, bit for bit
    (prefill and decode); so does generate."""
    if not hasattr(transformers, cls):
        pytest.skip(f"this transformers has no {cls}")
    q, plain = folders(family)
    ours = _dequant_paths(load_quantized(q))
    assert all(m.apply_gate is not None for m in moe_modules(ours).values())
    ref = load_bf16_eager(plain)
    assert torch.equal(_logits(ours), _logits(ref))
    assert torch.equal(_logits(ours, IDS[:, :1]), _logits(ref, IDS[:, :1]))
    assert torch.equal(ours.generate(IDS[:, :4], max_new_tokens=4, do_sample=False),
                       ref.generate(IDS[:, :4], max_new_tokens=4, do_sample=False))  # fmt: skip


def test_experts_with_their_own_gate_run_it(folders):
    """DeepSeek-V4's experts (per-expert on disk) gate with a clamped SwiGLU, their class's own
    _apply_gate: the 4-bit experts ran silu(gate) * up without the clamp, silently other logits than
    transformers on the same weights. They now run the module's _apply_gate: on the dequantize path
    the logits equal those of the dequantized folder loaded by transformers, bit for bit (prefill and
    decode), as for the other families; the clamp binds (limit 0.1), so the old forward differed."""
    q, plain = folders("deepseek_v4")
    ours = _dequant_paths(load_quantized(q))
    ref = load_bf16_eager(plain)
    assert ref.config.swiglu_limit == 0.1
    assert torch.equal(_logits(ours), _logits(ref))
    assert torch.equal(_logits(ours, IDS[:, :1]), _logits(ref, IDS[:, :1]))
    eager = load_quantized(q)  # the default (GEMV) path: the same tokens
    assert torch.equal(eager.generate(IDS[:, :4], max_new_tokens=4, do_sample=False),
                       ref.generate(IDS[:, :4], max_new_tokens=4, do_sample=False))  # fmt: skip


@pytest.mark.skipif(not hasattr(transformers, "HYV4ForCausalLM"), reason="no HY-V4")
def test_experts_with_neither_act_fn_nor_own_gate_are_refused_by_name(folders, monkeypatch):
    """An experts module with no act_fn and no _apply_gate of its own has no activation to run: a
    MoeLoadError names the module class and --moe-experts keep (not an AttributeError)."""
    from transformers.models.hy_v4 import modeling_hy_v4

    from converter.loader.moe_records import MoeLoadError

    q, _ = folders("hy_v4")
    monkeypatch.delattr(modeling_hy_v4.HYV4Experts, "_apply_gate")
    with pytest.raises(MoeLoadError, match=r"HYV4Experts has neither an act_fn.*--moe-experts keep"):
        load_quantized(q)


@pytest.mark.skipif(not hasattr(transformers, "DeepseekV4ForCausalLM"), reason="no DeepSeek-V4")
@pytest.mark.parametrize("mode", ["quantize", "keep"])
def test_deepseek_v4_router_bias_is_loaded(tmp_path, mode):
    """DeepSeek-V4 stores its router's score-correction bias as ``ffn.gate.bias``, which transformers
    renames to the buffer ``mlp.gate.e_score_correction_bias`` (it picks the top-k experts). The loader
    renamed checkpoint keys onto parameters only: the bias was reported unused and stayed zero, so the
    tokens were routed to other experts than in transformers. It is now loaded (float32, as
    transformers keeps it) and the logits equal the dequantized folder's in transformers."""
    from safetensors.torch import load_file, save_file

    from converter.loader.dequantize import dequantize_checkpoint

    src = make_moe("deepseek_v4", tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    biases = [k for k in tensors if k.endswith(".ffn.gate.bias")]
    assert biases
    for k in biases:  # random init leaves it zero; a trained checkpoint's is not
        tensors[k] = (2 * torch.randn(tensors[k].shape, generator=g)).to(tensors[k].dtype)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(src, tmp_path / "q", moe_experts=mode, progress=False)
    dequantize_checkpoint(tmp_path / "q", tmp_path / "plain")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = _dequant_paths(load_quantized(tmp_path / "q"))
    assert not [w for w in caught if "unused" in str(w.message)]
    ref = load_bf16_eager(tmp_path / "plain")
    for i, layer in enumerate(ours.model.layers):
        bias = layer.mlp.gate.e_score_correction_bias
        assert bias.dtype == torch.float32
        assert torch.equal(bias, tensors[f"model.layers.{i}.ffn.gate.bias"].float())
        assert torch.equal(bias, ref.model.layers[i].mlp.gate.e_score_correction_bias)
    assert torch.equal(_logits(ours), _logits(ref))


@pytest.mark.skipif(not hasattr(transformers, "DeepseekV4ForCausalLM"), reason="no DeepSeek-V4")
def test_deepseek_v4_in_its_own_names_loads_like_transformers(tmp_path):
    """DeepSeek's own checkpoints name tensors without the ``model.`` prefix (``embed.weight``,
    ``hc_head_fn``, ``layers.0.attn.wq_a.weight``, ``head.weight``), which transformers renames with
    patterns anchored at the start (``^embed\\.weight`` -> ``embed_tokens.weight``) and then prefixes. The
    loader tried the renamings on the prefixed key only: the embedding and the hyper-connection head were
    reported unused and left uninitialised (logits ~0.7 off). They now load: the logits equal those of
    the same checkpoint in transformers' own names."""
    from safetensors.torch import load_file, save_file

    src = make_moe("deepseek_v4", tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    own = {"embed_tokens.weight": "embed.weight", "hc_head.hc_fn": "hc_head_fn",
           "hc_head.hc_base": "hc_head_base", "hc_head.hc_scale": "hc_head_scale"}  # fmt: skip
    raw = {own.get(k.removeprefix("model."), k.removeprefix("model.")): v for k, v in tensors.items()}
    assert "embed.weight" in raw
    assert "hc_head_fn" in raw
    shutil.copytree(src, tmp_path / "raw")
    save_file(raw, tmp_path / "raw" / "model.safetensors", metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(src, tmp_path / "q", moe_experts="quantize", progress=False)
        convert(tmp_path / "raw", tmp_path / "q_raw", moe_experts="quantize", progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = load_quantized(tmp_path / "q_raw")
    assert not [w for w in caught if "unused" in str(w.message)]
    assert torch.equal(_logits(ours), _logits(load_quantized(tmp_path / "q")))


@pytest.mark.skipif(not hasattr(transformers, "DeepseekV4ForCausalLM"), reason="no DeepSeek-V4")
def test_deepseek_v4_hash_router_table_is_loaded(tmp_path):
    """DeepSeek-V4's first layers route by a fixed token -> experts table, the buffer ``tid2eid``
    (``ffn.gate.tid2eid`` on disk, ``mlp.gate.tid2eid`` in transformers): it was reported unused and
    stayed zero, so every token went to expert 0; it is now loaded as transformers loads it."""
    model_type, arch, kwargs = MOE["deepseek_v4"]
    cfg = transformers.AutoConfig.for_model(model_type, **dict(kwargs, mlp_layer_types=["hash_moe", "moe"]))
    cfg.architectures = [arch]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, arch)(cfg).to(torch.bfloat16).eval()
        table = model.model.layers[0].mlp.gate.tid2eid
        table.copy_(torch.stack([torch.randperm(cfg.num_local_experts)[:2] for _ in range(len(table))]))
        model.save_pretrained(tmp_path / "src")
        convert(tmp_path / "src", tmp_path / "q", moe_experts="quantize", progress=False)
    ours = load_quantized(tmp_path / "q")
    assert torch.equal(ours.model.layers[0].mlp.gate.tid2eid, table)


@pytest.mark.skipif(not hasattr(transformers, "DeepseekV4ForCausalLM"), reason="no DeepSeek-V4")
def test_experts_with_their_own_gate_decode_grouped_on_the_cpu(folders, monkeypatch):
    """A decode step of experts with their class's own gate (DeepSeek-V4) runs the two grouped GEMVs per
    layer with the gate between them, as SiLU experts do, instead of one GEMV per hit expert and
    projection behind a Python loop over the experts (what it ran before), and generates the tokens of
    transformers on the dequantized weights."""
    import converter.loader.moe as moe

    q, plain = folders("deepseek_v4_i64")
    model = load_quantized(q)
    if moe._grouped_kernel() is None:
        pytest.skip("no grouped CPU kernel in this build")
    calls = {"grouped": 0, "loop": 0}
    grouped, rows = moe._grouped_gemv_rows, moe._expert_rows

    def counted_grouped(*args, **kwargs):
        calls["grouped"] += 1
        return grouped(*args, **kwargs)

    def counted_rows(*args, **kwargs):
        calls["loop"] += 1
        return rows(*args, **kwargs)

    monkeypatch.setattr(moe, "_grouped_gemv_rows", counted_grouped)
    monkeypatch.setattr(moe, "_expert_rows", counted_rows)
    with torch.no_grad():
        model(IDS[:, :1])
    assert calls == {"grouped": 2 * len(moe_modules(model)), "loop": 0}
    monkeypatch.undo()
    ref = load_bf16_eager(plain)
    assert torch.equal(model.generate(IDS[:, :4], max_new_tokens=4, do_sample=False),
                       ref.generate(IDS[:, :4], max_new_tokens=4, do_sample=False))  # fmt: skip


@pytest.mark.skipif(not hasattr(transformers, "DeepseekV4ForCausalLM"), reason="no DeepSeek-V4")
@pytest.mark.parametrize("name", ["deepseek_v4", "deepseek_v4_i64"])
@pytest.mark.parametrize("tokens", [3, 12], ids=["decode", "prefill"])
def test_experts_with_their_own_gate_within_the_derived_float32_bound(folders, name, tokens):
    """Experts with their class's own clamped SwiGLU (DeepSeek-V4), computing in float32 on the default
    path (deepseek_v4_i64 decode: the grouped CPU GEMVs; deepseek_v4, intermediate 96: the per-expert
    loop, down by dequantize + matmul), stay within experts_reference_and_bound's derived bound, which
    follows their gate (clamps, limit 0.1); the same layer with one down weight moved by one 4-bit code
    step leaves it."""
    m = next(iter(moe_modules(load_quantized(folders(name)[0])).values()))
    within, outside = down_code_step_ratios(m, *random_routes(m, tokens))
    assert within <= 1 < outside


@pytest.mark.parametrize("name", FAMILIES)
def test_model_dequantize_restores_transformers_experts(folders, name, tmp_path):
    """model.dequantize(): the 4-bit experts become transformers' own experts module again (and the
    4-bit linears nn.Linear), with the logits of the dequantized bf16 folder, bit for bit; the model
    saves as a plain checkpoint that transformers loads."""
    q, plain = folders(name)
    model = load_quantized(q)
    kinds = {n: type(m) for n, m in load_bf16_eager(plain).named_modules() if n in moe_modules(model)}
    model.dequantize()
    assert not moe_modules(model)
    assert not linear4bit_modules(model)
    for n, cls in kinds.items():
        experts = model.get_submodule(n)
        assert type(experts) is cls
        assert experts.gate_up_proj.dtype == torch.bfloat16
        assert experts.gate_up_proj.device.type == "cpu"
    ref = load_logged(plain, dtype=torch.bfloat16)[
        0
    ]  # transformers' default experts implementation, as the loaded model's
    assert torch.equal(_logits(model), _logits(ref))
    model.save_pretrained(tmp_path / "saved")
    assert torch.equal(_logits(load_logged(tmp_path / "saved", dtype=torch.bfloat16)[0]), _logits(ref))


def test_model_double_dequantize_decodes_the_experts_in_float64(folders):
    """model.double().dequantize(): the experts are decoded in float64 as the 4-bit linears are (the
    float32 weights, cast: float64 holds each product exactly); the experts' decode refused float64
    ("out_dtype torch.float64 is not supported"), and dequantize(torch.float64) with it."""
    q, _ = folders("qwen3_moe")
    model = load_quantized(q).double()
    float32 = {n: m.expert_weights(0, torch.float32) for n, m in moe_modules(model).items()}
    assert float32
    model.dequantize()
    assert not moe_modules(model)
    for n, (gate_up, down) in float32.items():
        experts = model.get_submodule(n)
        assert experts.gate_up_proj.dtype == torch.float64
        assert torch.equal(experts.gate_up_proj[0], gate_up.double())
        assert torch.equal(experts.down_proj[0], down.double())


def test_experts_are_views_of_one_buffer_per_layer(folders):
    q, _ = folders("deepseek_v3")
    model = load_quantized(q)
    for m in moe_modules(model).values():
        gate_up, down = m.expert_weights(3)
        assert gate_up.shape == (2 * m.intermediate_dim, m.hidden_dim)
        assert down.shape == (m.hidden_dim, m.intermediate_dim)
        assert m.packed.is_contiguous()
        assert m.packed[3].data_ptr() == m.packed.data_ptr() + 3 * m.packed.stride(0)
    shared = model.model.layers[1].mlp.shared_experts
    # QuantLinear4bit, or its bnb subclass Linear4bit once an earlier test imported bitsandbytes
    assert all(isinstance(getattr(shared, p), QuantLinear4bit) for p in ("gate_proj", "up_proj", "down_proj"))


@pytest.mark.parametrize("tokens", [1, 3, 12])
def test_gemv_path_within_derived_bound(folders, tokens):
    """float32 compute: decode (<= 8 tokens per expert: fused GEMV) and mixed batches (an expert with
    more tokens is dequantized once) stay within the derived float32 error bound of the exact result."""
    q, _ = folders("qwen3_moe")
    assert_float32_experts_within_bound(q, tokens)


def test_bf16_prefill_multiplies_in_float32_without_native_bf16_matmuls(folders, monkeypatch):
    """An expert with more than 8 bf16 tokens under no_grad on a CPU without AVX512_BF16 (a path below
    avx512bf16, as QM_CPU_ISA forces it): the exact float32 weights, x widened, one float32 matmul per
    projection rounded once to bf16, as the 4-bit linear layers' prefill there (torch's bf16 GEMM is 4-7x
    slower than float32's on such CPUs); ``use_gemv = False`` and grad mode keep transformers' bf16 loop."""
    from converter.kernels import bnb4bit

    q, _ = folders("qwen3_moe")
    model = load_quantized(q)
    experts = next(iter(moe_modules(model).values()))
    tokens = 12  # every token to experts 0 and 1: 12 rows each, past the GEMV's 8
    x = torch.randn(tokens, model.config.hidden_size).to(torch.bfloat16)
    index = torch.tensor([[0, 1]] * tokens)
    weights = torch.rand(tokens, 2).to(torch.bfloat16)

    def reference(dtype: torch.dtype) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in (0, 1):
            gu, dn = experts.expert_weights(e, dtype)
            gate, up = F.linear(x.to(dtype), gu).to(x.dtype).chunk(2, dim=-1)
            y = F.linear((experts.act_fn(gate) * up).to(dtype), dn).to(x.dtype)
            out = out + y * weights[:, e, None]
        return out

    monkeypatch.setenv("QM_CPU_ISA", "avx2" if "avx2" in bnb4bit.cpu_isas() else "scalar")
    with torch.no_grad():
        assert torch.equal(experts(x, index, weights), reference(torch.float32))
        experts.use_gemv = False
        assert torch.equal(experts(x, index, weights), reference(torch.bfloat16))
    experts.use_gemv = True
    assert torch.equal(experts(x, index, weights), reference(torch.bfloat16))  # grad mode: training


@pytest.mark.parametrize("name", FAMILIES)
def test_generate_matches_dequantized_model(folders, name):
    q, plain = folders(name)
    ours = _dequant_paths(load_quantized(q))
    ref = load_bf16_eager(plain)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = ours.generate(IDS[:, :4], **kw)
        b = ref.generate(IDS[:, :4], **kw)
    assert torch.equal(a, b)
    fast = load_quantized(q)  # fused GEMV at decode: runs, same length, valid token ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = fast.generate(IDS[:, :4], **kw)
    assert c.shape == a.shape
    assert int(c.max()) < fast.config.vocab_size


def test_keep_folder_loads_with_16bit_experts(tmp_path):
    """A default (keep) conversion loads too: per-expert 16-bit tensors are stacked into the fused
    parameters, Mixtral's router key is renamed as transformers renames it."""
    src = make_moe("mixtral", tmp_path / "src")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(src, tmp_path / "keep", progress=False)
    model = load_quantized(tmp_path / "keep")
    assert not moe_modules(model)
    experts = model.model.layers[0].mlp.experts
    ref = load_bf16_eager(src)
    assert torch.equal(experts.gate_up_proj, ref.model.layers[0].mlp.experts.gate_up_proj)
    assert torch.equal(model.model.layers[0].mlp.gate.weight, ref.model.layers[0].mlp.gate.weight)
    assert torch.isfinite(_logits(model)).all()


def test_longcat_flash_keep_folder_loads_with_its_zero_experts(tmp_path):
    """LongCat-Flash's zero-computation (identity) experts follow its routed ones: transformers'
    LongcatFlashExperts holds a (never used) gate_up_proj row for each, and no down_proj, and its
    save_pretrained writes their gate/up weights without a down weight, which --moe-experts keep copies.
    load_quantized refused such a folder ("needs 6 experts x gate/up/down; expert 4 down is missing") although
    inspect and the model card named it among the loaders. It now stacks every expert's gate/up and the
    routed ones' down as transformers does: the experts equal the source's, tokens routed to the identity
    experts included, the logits (prefill and decode) and greedy generate equal the dequantized folder's in
    transformers, bit for bit, on the dequantize path; the default (GEMV) path generates too. (transformers
    5.25 keeps no rows for the identity experts, and its save_pretrained writes none: the routed ones
    only, tested the same way; a folder with such rows under 5.25: the next test.)"""
    from converter.loader.dequantize import dequantize_checkpoint

    src = make_longcat_flash(tmp_path / "src")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(src, tmp_path / "keep", progress=False)
    dequantize_checkpoint(tmp_path / "keep", tmp_path / "plain")
    # the reference's experts loop: transformers 5.25 runs LongcatFlashExperts by experts_implementation
    # (grouped_mm by default, as stock from_pretrained), 5.24 by its own loop whatever was asked
    eager = dict(device="cpu", dtype=torch.bfloat16, experts_implementation="eager")
    model = _dequant_paths(load_quantized(tmp_path / "keep", **eager))
    assert linear4bit_modules(model)
    assert not moe_modules(model)
    ref = load_bf16_eager(tmp_path / "plain")
    source = load_bf16_eager(src).state_dict()
    for key in ("gate_up_proj", "down_proj"):
        name = f"model.layers.0.mlp.experts.{key}"
        assert torch.equal(model.state_dict()[name], source[name]), name
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == (6 if longcat_zero_rows() else 4)
    assert model.model.layers[0].mlp.experts.down_proj.shape[0] == 4
    routed = []
    model.model.layers[0].mlp.router.register_forward_hook(lambda _m, _a, out: routed.append(out[2]))
    assert torch.equal(_logits(model), _logits(ref))
    assert int(routed[0].max()) >= 4  # some tokens went to an identity expert
    assert torch.equal(_logits(model, IDS[:, :1]), _logits(ref, IDS[:, :1]))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(model.generate(IDS[:, :4], **kw), ref.generate(IDS[:, :4], **kw))
        fast = load_quantized(tmp_path / "keep", device="cpu", dtype=torch.bfloat16)
        out = fast.generate(IDS[:, :4], **kw)
    assert out.shape == (1, 10)
    assert int(out.max()) < fast.config.vocab_size


def test_longcat_flash_keep_folder_from_a_5_24_save_loads_under_5_25(tmp_path):
    """transformers 5.25's LongcatFlashExperts keeps no gate_up_proj rows for LongCat-Flash's identity
    experts, so a keep folder converted from a checkpoint that 5.24's save_pretrained wrote (their gate/up
    weights, no down weight) failed in load_quantized ("needs 4 experts x gate/up/down; the checkpoint also
    holds expert(s) [4, 5]; config.json and the shards disagree"), as it fails in stock transformers 5.25.
    No version's forward reads those rows: load_quantized leaves them out and names them unused, and the
    model equals, logits and greedy generate bit for bit, the one loaded from the same model saved without
    them. Under 5.24 both folders are the same checkpoint."""
    from_524 = make_longcat_flash(tmp_path / "src_524", zero_rows=True)
    native = make_longcat_flash(tmp_path / "src")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(from_524, tmp_path / "keep_524", progress=False)
        convert(native, tmp_path / "keep", progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = _dequant_paths(load_quantized(tmp_path / "keep_524", device="cpu", dtype=torch.bfloat16))
    ref = _dequant_paths(load_quantized(tmp_path / "keep", device="cpu", dtype=torch.bfloat16))
    unused = [str(w.message) for w in caught if "unused by" in str(w.message)]
    zero_keys = [f"model.layers.0.mlp.experts.{e}.{p}_proj.weight" for e in (4, 5) for p in ("gate", "up")]
    if longcat_zero_rows():
        assert not unused
    else:
        assert unused == [
            f"{tmp_path / 'keep_524'}: 4 checkpoint tensor(s) unused by LongcatFlashForCausalLM: {zero_keys}"
        ]
    assert torch.equal(model.state_dict()["model.layers.0.mlp.experts.gate_up_proj"],
                       ref.state_dict()["model.layers.0.mlp.experts.gate_up_proj"])  # fmt: skip
    assert torch.equal(_logits(model), _logits(ref))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(model.generate(IDS[:, :4], **kw), ref.generate(IDS[:, :4], **kw))


def test_longcat_flash_without_zero_expert_rows_quantizes_and_loads(tmp_path):
    """A LongCat-Flash checkpoint as transformers 5.25 saves it (no rows for the identity experts, every
    routed expert with gate/up/down) converts with --moe-experts quantize like any MoE; under 5.25
    load_quantized runs its 4-bit experts: tokens routed to the identity experts included, the logits
    equal, bit for bit, the dequantized folder's in transformers on the dequantize path. transformers 5.24's
    LongcatFlashExperts wants those rows: load_quantized under it names the first one missing."""
    from converter.loader.dequantize import dequantize_checkpoint
    from converter.loader.moe_records import MoeLoadError

    src = make_longcat_flash(tmp_path / "src", zero_rows=False)
    convert(src, tmp_path / "q", moe_experts="quantize", progress=False, warn=lambda _: None)
    if longcat_zero_rows():
        missing = "needs 6 experts x gate/up, the first 4 down too; expert 4 gate is missing"
        with pytest.raises(MoeLoadError, match=missing):
            load_quantized(tmp_path / "q", device="cpu")
        return
    dequantize_checkpoint(tmp_path / "q", tmp_path / "plain")
    model = _dequant_paths(load_quantized(tmp_path / "q", device="cpu", dtype=torch.bfloat16))
    assert len(moe_modules(model)) == 1
    ref = load_bf16_eager(tmp_path / "plain")
    routed = []
    model.model.layers[0].mlp.router.register_forward_hook(lambda _m, _a, out: routed.append(out[2]))
    assert torch.equal(_logits(model), _logits(ref))
    assert int(routed[0].max()) >= 4  # some tokens went to an identity expert


def test_longcat_flash_4bit_zero_experts_are_refused_by_name(tmp_path, monkeypatch):
    """--moe-experts quantize refuses LongCat-Flash's zero experts; a folder that has them 4-bit anyway
    (made here with that check off) is refused by load_quantized naming the layer, the model type, what
    those experts are and the conversion that loads, not as a damaged folder."""
    from converter.loader.moe_records import MoeLoadError
    from converter.plan import moe

    src = make_longcat_flash(tmp_path / "src", zero_rows=True)
    monkeypatch.setattr(moe, "check_experts", lambda *a, **k: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(src, tmp_path / "q", moe_experts="quantize", progress=False)
    with pytest.raises(MoeLoadError) as err:
        load_quantized(tmp_path / "q", device="cpu")
    assert str(err.value) == (
        f"{tmp_path / 'q'}: 'model.layers.0.mlp.experts' (longcat_flash) holds 4-bit experts and 2 "
        "zero-computation (identity) experts, whose gate/up rows have no down weight: load_quantized stacks "
        "4-bit experts with all three projections only; load a folder whose experts stay 16-bit "
        "(quantize-model convert --moe-experts keep)"
    )


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_base_model_class_takes_the_experts(folders, name):
    """model_class=<the base model> (AutoModel: hidden states for embeddings) strips the checkpoint's
    base-model prefix, as transformers does and as load_quantized did for every other key; the experts'
    keys kept it, and the load failed ("per-expert tensors under 'model.layers.0.mlp.experts' have no
    fused experts module"). The base model's hidden states are the causal LM's."""
    import transformers

    q, _ = folders(name)
    causal = load_quantized(q)
    base = load_quantized(q, model_class=transformers.AutoModel)
    assert type(base) is type(causal.model)
    assert len(moe_modules(base)) == len(moe_modules(causal))
    with torch.no_grad():
        assert torch.equal(base(IDS).last_hidden_state, causal.model(IDS).last_hidden_state)


def _with_mtp_layer(src, dst):
    """``src`` (tiny DeepSeek-V3, 2 layers) with the multi-token-prediction layer DeepSeek-V3 and GLM-4.5
    ship after their last decoder layer (``model.layers.61.*`` / ``model.layers.46.*``, routed experts
    included), which their transformers classes have no module for: here layer 2, a copy of layer 1
    plus the MTP projections."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    for key in [k for k in tensors if k.startswith("model.layers.1.")]:
        tensors[key.replace("model.layers.1.", "model.layers.2.")] = tensors[key].clone()
    tensors["model.layers.2.eh_proj.weight"] = torch.zeros(64, 128, dtype=torch.bfloat16)
    for leaf in ("enorm", "hnorm", "shared_head.norm"):
        tensors[f"model.layers.2.{leaf}.weight"] = torch.ones(64, dtype=torch.bfloat16)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("mode", ["keep", "quantize"])
def test_experts_of_a_layer_the_model_lacks_are_unused(tmp_path, mode):
    """DeepSeek-V3's and GLM-4.5's checkpoints hold an MTP layer that transformers loads as unexpected
    keys; load_quantized refused every such folder ("per-expert tensors under 'model.layers.2.mlp.experts'
    have no fused experts module"). Its experts are now unused tensors, named in the warning like the
    layer's other tensors, and the model is the one converted without that layer."""
    src = make_moe("deepseek_v3", tmp_path / "src")
    mtp = _with_mtp_layer(src, tmp_path / "mtp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(src, tmp_path / "plain", moe_experts=mode, progress=False)
        convert(mtp, tmp_path / "out", moe_experts=mode, progress=False)
    with pytest.warns(UserWarning, match=r"unused by DeepseekV3ForCausalLM") as caught:
        model = load_quantized(tmp_path / "out")
    (message,) = [str(w.message) for w in caught if "unused by" in str(w.message)]
    n = re.search(r"(\d+) checkpoint tensor\(s\) unused", message)
    assert n is not None
    assert int(n[1]) == sum(1 for k in _keys(tmp_path / "out") if k.startswith("model.layers.2."))
    assert "model.layers.2." in message
    assert torch.equal(_logits(model), _logits(load_quantized(tmp_path / "plain")))


def _keys(folder) -> list[str]:
    """Tensor names of a folder's shards, a quantized weight once (its components left out)."""
    from formats.reader import open_folder

    reader = open_folder(folder)
    return [*reader.quantized, *reader.passthrough]


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from converter.loader.model import load_quantized
    from converter.loader.moe import moe_modules
    m = next(iter(moe_modules(load_quantized(sys.argv[1])).values()))
    x = torch.randn(3, m.hidden_dim, dtype=torch.bfloat16)
    idx = torch.tensor([[0, 1], [2, 3], [1, 2]])
    w = torch.rand(3, 2, dtype=torch.bfloat16)
    eager = m(x, idx, w)
    compiled = torch.compile(m, fullgraph=True, backend="inductor")
    assert torch.equal(compiled(x, idx, w), eager)
    print("ok")
    """
)


def test_torch_compile_fullgraph(folders):
    """The experts forward is one custom op (quantize_model::moe_experts_4bit): it compiles with
    fullgraph=True and gives the eager bits. Runs in a subprocess because `make test` disables dynamo."""
    q, _ = folders("olmoe")
    env = {k: v for k, v in os.environ.items() if k != "TORCHDYNAMO_DISABLE"}
    r = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, str(q)], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("ok")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shared_x", [True, False])
def test_grouped_gemv_equals_per_expert_gemv(dtype, shared_x):
    """The grouped kernel runs gemv_4bit's row kernels on each (row, expert) pair: bit-identical to one
    gemv_4bit call per expert (gate_up region at offset 0, down region after it)."""
    from converter.kernels import bnb4bit as kernels
    from converter.loader import moe as moe_loader
    from formats.codebooks import NF4
    from formats.quant_types import QuantType

    g = torch.Generator().manual_seed(0)
    experts, out_f, in_f, bs = 5, 96, 128, 64
    weights = [torch.randn(out_f, in_f, generator=g) for _ in range(experts)]
    pieces = [kernels.quantize_4bit(w, blocksize=bs, quant_type=QuantType.NF4) for w in weights]
    pad_bytes, pad_blocks = 32, 4  # a region before the weight, as down_proj sits after gate_up
    packed = torch.zeros(experts, pad_bytes + out_f * in_f // 2, dtype=torch.uint8)
    absmax = torch.zeros(experts, pad_blocks + out_f * in_f // bs)
    for e, (p, a) in enumerate(pieces):
        packed[e, pad_bytes:] = p
        absmax[e, pad_blocks:] = a
    qmap = torch.tensor(NF4, dtype=torch.float32)
    ids = torch.tensor([3, 0, 3, 4, 1, 2, 0])
    x = torch.randn(1 if shared_x else ids.numel(), in_f, generator=g).to(dtype)
    got = moe_loader._grouped_gemv(
        x, ids, packed, absmax, qmap, byte_offset=pad_bytes, block_offset=pad_blocks,
        out_features=out_f, in_features=in_f, blocksize=bs,
    )  # fmt: skip
    for row, e in enumerate(ids.tolist()):
        xr = x[0 if shared_x else row].reshape(1, -1)
        p, a = pieces[e]
        ref = kernels.gemv_4bit(
            xr, p, a, out_features=out_f, in_features=in_f, blocksize=bs, quant_map=qmap, nested=None
        )
        assert torch.equal(got[row : row + 1], ref), row
    with pytest.raises(ValueError, match="expert id 9"):
        moe_loader._grouped_gemv(
            x, torch.tensor([9]), packed, absmax, qmap, byte_offset=0, block_offset=0,
            out_features=out_f, in_features=in_f, blocksize=bs,
        )  # fmt: skip


def test_device_map_with_disk_offload_gives_the_same_logits(folders, tmp_path):
    """4-bit experts under accelerate's placement (layers offloaded to disk run on the CPU in place).

    A layer's experts are stacked into one buffer at load, not a view of the shards: a disk layer's
    stack stayed in RAM, outside max_memory["cpu"], while the plan, the estimate and memory_by_device
    counted it on disk. It is written to offload_folder and mapped from there (its pages dropped
    after each forward), as a parameter cast at load is; without offload_folder the load says so."""
    from converter.loader.file_mappings import mapped_from
    from converter.loader.placement import PlacementError, ReleaseMappedPages

    q, _ = folders("olmoe")
    budget = {"cpu": "60KB"}
    with pytest.raises(PlacementError, match=r"experts\.packed'.*offload_folder"):
        load_quantized(q, device_map="auto", max_memory=budget)
    off = tmp_path / "offload"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        placed = load_quantized(q, device_map="auto", max_memory=budget, offload_folder=off)
    disk = [n for n, d in placed.hf_device_map.items() if d == "disk"]
    stacks = [(n, m) for n, m in moe_modules(placed).items() if any(n.startswith(f"{d}.") for d in disk)]
    assert stacks
    [written] = off.iterdir()
    for _, experts in stacks:
        assert mapped_from(experts.packed, [written])
        assert mapped_from(experts.absmax, [written])
    layer = placed.get_submodule(stacks[0][0].rsplit(".mlp", 1)[0])
    [hook] = [h for h in layer._hf_hook.hooks if isinstance(h, ReleaseMappedPages)]
    start = stacks[0][1].packed.data_ptr()
    assert any(a <= start + 4095 and start + 4096 <= b for a, b in hook.ranges)  # its pages are dropped
    assert torch.equal(_logits(placed), _logits(load_quantized(q)))


@pytest.mark.parametrize("name", FAMILIES)
def test_save_pretrained_writes_the_source_expert_records(folders, name, tmp_path):
    """save_pretrained of a loaded model writes every expert's bnb record again under the checkpoint's
    names (Mixtral's block_sparse_moe.experts.<e>.w1 too): the same keys as the source folder, the expert
    tensors equal (nested codes, nested absmax, offset in the quant-state JSON), and the saved folder
    loads to the same logits."""
    from safetensors.torch import load_file

    q, _ = folders(name)
    model = load_quantized(q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "saved")
    src, saved = {}, {}
    for folder, tensors in ((q, src), (tmp_path / "saved", saved)):
        for f in sorted(folder.glob("*.safetensors")):
            tensors.update(load_file(f))
    assert set(saved) == set(src)
    experts = [k for k in src if ".experts." in k]
    assert experts
    for key in experts:
        assert saved[key].dtype == src[key].dtype, key
        assert torch.equal(saved[key], src[key]), key
    assert torch.equal(_logits(load_quantized(tmp_path / "saved")), _logits(model))


@pytest.mark.parametrize(
    ("change", "expected"), [(-1, "holds expert(s) [3]"), (1, "expert 4 gate is missing")]
)
def test_expert_count_disagreeing_with_the_config_is_named(folders, tmp_path, change, expected):
    """A config with fewer experts than the shards hold said "expert 3 gate is missing" (it is extra)."""
    import json
    import shutil

    from converter.loader.moe import MoeLoadError

    folder = tmp_path / "q"
    shutil.copytree(folders("qwen3_moe")[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_local_experts"] += change  # transformers 5 writes Qwen3-MoE's num_experts under this name
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoeLoadError, match=re.escape(expected)):
        load_quantized(folder, device="cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize(
    ("key", "shape", "expected"),
    [
        ("model.layers.1.mlp.experts.3.gate_proj.weight", (32, 64), "gate_proj.weight' has shape [32, 64]"),
        ("model.layers.1.mlp.experts.3.down_proj.weight", (64, 128), "down_proj.weight' has shape [64, 128]"),
        (None, None, "experts.0.gate_proj.weight' has shape [64, 64], the model wants [32, 64]"),
    ],
    ids=["one-expert-rows", "one-expert-cols", "config-disagrees"],
)
def test_keep_folder_with_mismatched_expert_shapes_is_named(tmp_path, monkeypatch, key, shape, expected):
    """16-bit (keep) experts are checked against the model's shapes like 4-bit ones: one odd expert was a raw
    "stack expects each tensor to be equal size"; experts that all disagree with config.json were stacked
    into parameters of the checkpoint's shape, and the model ran with another intermediate size."""
    import json

    from safetensors.torch import load_file, save_file

    from converter.loader.moe import MoeLoadError

    src = make_moe("qwen3_moe", tmp_path / "src")
    if key is not None:
        tensors = load_file(src / "model.safetensors")
        tensors[key] = torch.zeros(shape, dtype=torch.bfloat16)
        save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    # convert refuses such a source (test_moe_convert.py); a folder written by an older version or another
    # tool can still hold one
    monkeypatch.setattr("converter.plan.moe.check_experts", lambda *a, **k: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(src, tmp_path / "keep", progress=False)
    if key is None:
        config = json.loads((tmp_path / "keep" / "config.json").read_text())
        config["moe_intermediate_size"] = 32
        (tmp_path / "keep" / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoeLoadError, match=re.escape(expected)):
        load_quantized(tmp_path / "keep", device="cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("nested", [True, False])
def test_stacked_absmax_equals_each_records_decoded_absmax(tmp_path, nested):
    """stack_records decodes a layer's nested absmax in one vectorised pass per projection: bit for bit
    what ops.decoded_absmax gives each record alone (the kernels' product-then-sum)."""
    from converter.loader import ops
    from converter.loader.module import state_from_record
    from converter.loader.moe_records import ROLES, ExpertsLayout
    from converter.loader.state import load_quantized_state

    src = make_moe("qwen3_moe", tmp_path / "src")
    convert(src, tmp_path / "q", moe_experts="quantize", double_quant=nested, progress=False)
    state = load_quantized_state(tmp_path / "q")
    model = load_quantized(tmp_path / "q")
    checked = 0
    for name, m in moe_modules(model).items():
        lay = ExpertsLayout(m.hidden_dim, m.intermediate_dim, m.blocksize)
        for e in range(m.num_experts):
            for role, proj in zip(ROLES, m.proj_names, strict=True):
                rec = state[f"{name}.{e}.{proj}.weight"]
                assert (rec.nested is not None) == nested
                _, ao, _ = lay.offsets(role)
                want = ops.decoded_absmax(state_from_record(rec)).reshape(-1)
                assert torch.equal(m.absmax[e, ao : ao + want.numel()], want)
                checked += 1
    assert checked >= 3 * 2 * 4


def test_each_layers_expert_records_are_released_once_stacked(tmp_path, monkeypatch):
    """attach_experts drops a layer's per-expert records before it stacks the next layer: on a streamed
    GPU load they are device tensors, and keeping all of them to the end doubled the experts' memory."""
    import weakref

    from converter.loader import moe_attach as moe_module
    from converter.loader.model import build_skeleton
    from converter.loader.state import load_quantized_state

    src = make_moe("qwen3_moe", tmp_path / "src")
    convert(src, tmp_path / "q", moe_experts="quantize", progress=False)
    state = load_quantized_state(tmp_path / "q")
    real = moe_module.stack_records
    earlier: list[weakref.ref] = []
    alive_at_each_call: list[int] = []

    def stack(experts, *args, **kwargs):
        alive_at_each_call.append(sum(ref() is not None for ref in earlier))
        earlier.extend(weakref.ref(rec) for parts in experts.values() for _, rec in parts.values())
        return real(experts, *args, **kwargs)

    monkeypatch.setattr(moe_module, "stack_records", stack)
    build_skeleton(tmp_path / "q", state, torch.bfloat16)
    assert len(alive_at_each_call) >= 2
    assert alive_at_each_call == [0] * len(alive_at_each_call)


@pytest.mark.parametrize("name", FAMILIES)
def test_num_parameters_counts_the_4bit_experts(folders, name):
    """num_parameters() of a 4-bit MoE folder equals the plain model's: each expert's gate, up and down
    weights (E · 3 · I · H, held as packed buffers) are counted, with or without the embeddings."""
    q, plain = folders(name)
    model, ref = load_quantized(q), load_bf16_eager(plain)
    for exclude in (False, True):
        expected = ref.num_parameters(exclude_embeddings=exclude)
        assert model.num_parameters(exclude_embeddings=exclude) == expected


def test_int8_experts_are_refused_by_name_and_not_listed_as_ours(tmp_path):
    """An LLM.int8 folder whose experts are per-expert int8 records (what transformers 4.x +
    bitsandbytes' load_in_8bit saves for Mixtral, whose experts were nn.Linear then): load_quantized
    failed with "TypeError: expected Tensor ... but got Int8Tensor", and inspect listed load_quantized
    ("4-bit experts run by its own kernels") and unsloth as its loaders."""
    from tiny_models import int8_experts

    from converter.loader.moe_records import MoeLoadError
    from converter.tools.inspection import inspect_path

    src = make_moe("mixtral", tmp_path / "src")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the advice to quantize the experts
        convert(src, tmp_path / "q", quant_type="int8", progress=False)
    int8_experts(tmp_path / "q")  # its index lists the new keys, no digests of the shard as converted
    with pytest.raises(MoeLoadError, match=r"model\.layers\.0\.block_sparse_moe\.experts.*int8.*dequantize"):
        load_quantized(tmp_path / "q")
    summary = inspect_path(tmp_path / "q").moe
    assert summary.layout == "experts quantized (per-expert bnb int8 records)"  # not "4-bit"
    assert summary.loaders == ("transformers 4.x + bitsandbytes",)
    assert any("load_quantized" in x for x in summary.not_loaders)


def test_4bit_routers_of_transformers_4x_folders_hold_the_decoded_record(tmp_path):
    """transformers 4.x + bitsandbytes quantized every nn.Linear but the head, MoE routers included
    (Mixtral's block_sparse_moe.gate was one then; older unsloth bnb-4bit MoE repos are such folders).
    load_quantized refused them: "'model.layers.0.block_sparse_moe.gate.weight' is quantized but
    'model.layers.0.mlp.gate' is a MixtralTopKRouter, not nn.Linear". The router now holds the record
    decoded, the weight transformers 4.x's Linear4bit computed with: bitsandbytes' dequantize_4bit,
    bit for bit, and the model's logits are those of the folder with that weight in 16 bit."""
    import json

    import bitsandbytes as bnb
    from safetensors.torch import load_file, save_file

    src = make_moe("mixtral", tmp_path / "src")
    convert(src, tmp_path / "q", moe_experts="quantize", progress=False)
    shard = tmp_path / "q" / "model.safetensors"
    tensors = load_file(shard)
    decoded: dict[str, torch.Tensor] = {}
    for key in [k for k in tensors if k.endswith("block_sparse_moe.gate.weight")]:
        w = tensors.pop(key)
        packed, state = bnb.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        tensors[key] = packed
        tensors.update({f"{key}.{k}": v for k, v in state.as_dict(packed=True).items()})
        decoded[key.replace("block_sparse_moe", "mlp")] = bnb.functional.dequantize_4bit(packed, state)
    assert len(decoded) == 2
    save_file(tensors, shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": dict.fromkeys(sorted(tensors), shard.name)}
    (tmp_path / "q" / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"]["llm_int8_skip_modules"] = None  # what transformers 4.x wrote
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))

    model = load_quantized(tmp_path / "q")
    for key, w in decoded.items():
        assert w.dtype == torch.bfloat16
        assert torch.equal(model.get_parameter(key), w)
    plain = tmp_path / "plain"
    tensors = {k: v for k, v in tensors.items() if ".block_sparse_moe.gate.weight." not in k}
    tensors.update({k.replace("mlp", "block_sparse_moe"): w for k, w in decoded.items()})
    plain.mkdir()
    save_file(tensors, plain / "model.safetensors", metadata={"format": "pt"})
    config["quantization_config"]["llm_int8_skip_modules"] = ["gate", "lm_head"]
    (plain / "config.json").write_text(json.dumps(config))
    assert torch.equal(_logits(model), _logits(load_quantized(plain)))


def test_model_card_lists_int8_experts_as_quantized(tmp_path):
    """push's model card found quantized experts by their 4-bit '.absmax' keys only: an indexed folder
    of per-expert int8 records ('.SCB', what transformers 4.x + bitsandbytes' load_in_8bit saves for
    Mixtral) got the dense card, its MoE row saying "experts kept in 16 bit"."""
    from tiny_models import int8_experts

    from converter.tools.push import build_model_card

    src = make_moe("mixtral", tmp_path / "src")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the advice to quantize the experts
        convert(src, tmp_path / "q", quant_type="int8", progress=False)
    int8_experts(tmp_path / "q")
    card = build_model_card(tmp_path / "q", "me/tiny-moe-int8")
    assert "experts kept in 16 bit" not in card
    assert "every routed MoE expert in 8 bit" in card
    assert "4 bit" not in card
    assert "Linear4bit" not in card
    loaders = card.split("## Which loaders read this folder")[1].split("Not:")[0]
    assert "transformers 4.x + bitsandbytes" in loaders
    assert "load_quantized" not in loaders
    assert 'load_quantized("me/tiny-moe-int8")' not in card  # it refuses int8 experts
    assert "quantize-model dequantize" in card


def test_estimate_reads_no_expert_bytes(folders, monkeypatch):
    """estimate / inspect --memory promise sizes "from the shard headers and the skeleton, no weight data
    read"; on a --moe-experts quantize folder they stacked every layer's experts on the CPU (all the
    expert bytes read and held at once: most of a large MoE's checkpoint, on the machine too small for
    it). The skeleton's experts are now meta tensors of the stacked shapes: the same bytes counted."""
    from converter.loader import moe_records
    from converter.loader.estimate import estimate
    from converter.loader.footprint import memory_by_device

    q, _ = folders("qwen3_moe")
    loaded = memory_by_device(load_quantized(q, device_map="cpu"))

    def read(*_):
        msg = "estimate read an expert's bytes"
        raise AssertionError(msg)

    # the stacking's reads of every expert's codes and absmax (moe_records' own use of ops only)
    monkeypatch.setattr(moe_records, "ops", types.SimpleNamespace(packed_bytes=read, decoded_absmax=read))
    assert estimate(q, "cpu")[1] == loaded


def test_estimate_with_a_dict_device_map_matches_the_offloaded_load(folders, tmp_path):
    """estimate(folder, {"model.layers.1": "disk", "": "cpu"}) (and inspect --memory --device-map '{...}')
    on a --moe-experts quantize folder failed with "NotImplementedError: Cannot copy out of meta tensor":
    accelerate's check_device_map lists model.state_dict(), and the meta-stacked experts' per-expert
    records were copied to the CPU. The records of meta experts stay meta; the numbers are the load's."""
    from converter.loader.estimate import estimate
    from converter.loader.footprint import memory_by_device

    q, _ = folders("qwen3_moe")
    device_map = {"model.layers.1": "disk", "": "cpu"}
    loaded = load_quantized(q, device_map=device_map, offload_folder=tmp_path / "offload")
    assert estimate(q, device_map)[1] == memory_by_device(loaded)


def test_memory_counts_the_experts_host_copies_of_their_nested_scales(folders):
    """A 4-bit experts layer keeps the folder's nested scales on the CPU for saving (1/64 byte per weight,
    beside the decoded absmax the forward reads); estimate(), memory_by_device and get_memory_footprint
    left them out (about 3% of the experts' bytes low). They count under "cpu", the same in the estimate
    as in the loaded model."""
    from converter.loader.estimate import estimate
    from converter.loader.footprint import memory_by_device, module_tensors

    q, _ = folders("qwen3_moe")
    model = load_quantized(q, device_map="cpu")
    nested = [t for m in moe_modules(model).values() for t in (m.nested_buffers() or {}).values()]
    host = sum(t.numel() * t.element_size() for t in nested)
    assert host > 0
    held = sum(size for _, _, size in module_tensors(model)) + host
    assert memory_by_device(model) == {"cpu": held}
    assert model.get_memory_footprint() == held
    assert estimate(q, "cpu")[1] == {"cpu": held}


def test_replace_linear_layers_on_a_moe_folder_points_to_load_quantized(folders):
    """replace_linear_layers on a transformers MoE model raised "has no module ... in the model" for every
    expert and stopped there: the message now says the experts load with load_quantized."""
    from converter.loader.replace import CheckpointMismatchError, replace_linear_layers

    q, _ = folders("qwen3_moe")
    config = transformers.AutoConfig.from_pretrained(q)
    del config.quantization_config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(CheckpointMismatchError, match=r"experts\.0\.\w+\.weight' has no module") as err:
        replace_linear_layers(model, q)
    assert str(err.value).endswith(
        "; the 4-bit MoE experts among them load with load_quantized, which builds the model's experts "
        "modules from them (replace_linear_layers swaps nn.Linear layers only)"
    )
