"""Llama 4: fused experts on disk, written per expert (the layout transformers loads pre-quantized).

transformers replaces every ``Llama4TextExperts`` by ``SequentialLlama4TextExperts`` (per-expert
``nn.Linear``) when it loads a pre-quantized bitsandbytes checkpoint; the converter shows the fused
``gate_up_proj [E, H, 2I]`` / ``down_proj [E, I, H]`` as ``experts.<e>.{gate,up,down}_proj.weight``
(converter/sources/llama4.py) so that both ``--moe-experts`` modes load with stock transformers +
bitsandbytes, with our loader, and dequantize back to the fused layout.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import transformers
from bnb_cpu_path import bnb_generic_cpu_path
from moe_helpers import (
    LLAMA4,
    assert_quantize_resumes_after_sigkill,
    assert_streamed_bytes_equal_whole_build,
    largest_fresh_tensors_of_dequantize,
    make_llama4,
)
from safetensors import safe_open

from converter.errors import InputError
from converter.kernels import bnb4bit as kernels
from converter.loader.dequantize import dequantize_checkpoint
from converter.loader.head import GemvHead
from converter.loader.model import linear4bit_modules, load_quantized
from converter.loader.moe import moe_modules
from converter.loader.moe_llama4 import QuantLlama4Experts4bit
from converter.plan.selection import SelectionError, patch_for_bnb, select_tensors
from converter.plan.selection_table import NO_CACHE_ENV
from converter.sources.llama4 import Llama4ExpertsSource, wrap_if_llama4
from converter.sources.local import LocalSource
from converter.tools.inspection import inspect_path
from converter.writer.pipeline import convert
from formats.quant_types import QuantType
from formats.reader import open_folder

E, H, INTER, LAYERS = LLAMA4["num_local_experts"], LLAMA4["hidden_size"], LLAMA4["intermediate_size"], 2
IDS = torch.tensor([[1, 5, 9, 33, 7, 100, 3, 64, 11, 90, 45, 12]])
#: (name, convert options): keep (the default) and quantize with NF4 nested / FP4 not nested
MODES = {
    "keep": {"moe_experts": "keep"},
    "nf4": {"moe_experts": "quantize", "quant_type": "nf4", "double_quant": True},
    "fp4": {"moe_experts": "quantize", "quant_type": "fp4", "double_quant": False},
}


@pytest.fixture(scope="module")
def llama4(tmp_path_factory: pytest.TempPathFactory):
    """llama4(name) -> folder: "src" (bf16, fused experts on disk) or a converted folder of MODES."""
    root = tmp_path_factory.mktemp("llama4")
    made: dict[str, Path] = {"src": make_llama4(root / "src")}

    def get(name: str) -> Path:
        if name not in made:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                convert(made["src"], root / name, progress=False, **MODES[name])
            made[name] = root / name
        return made[name]

    return get


def _source(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _per_expert(src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The per-expert nn.Linear weights of the fused source tensors, as transformers' docs define them."""
    out = {}
    for i in range(LAYERS):
        m = f"model.layers.{i}.feed_forward.experts"
        gu, dn = src[f"{m}.gate_up_proj"], src[f"{m}.down_proj"]
        for e in range(E):
            out[f"{m}.{e}.gate_proj.weight"] = gu[e][:, :INTER].T.contiguous()
            out[f"{m}.{e}.up_proj.weight"] = gu[e][:, INTER:].T.contiguous()
            out[f"{m}.{e}.down_proj.weight"] = dn[e].T.contiguous()
    return out


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _stock(folder: Path):
    """The folder loaded by stock transformers + bitsandbytes on the CPU (its generic dequantize +
    F.linear path on every CPU), and its loading info."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            folder, device_map="cpu", output_loading_info=True
        )
    return bnb_generic_cpu_path(model.eval()), info


def _dequant_paths(model: torch.nn.Module) -> torch.nn.Module:
    """Our 4-bit linears on their dequantize + F.linear path (as bitsandbytes' generic CPU forward), and
    the bf16 head on F.linear as transformers' (our CPU GEMV sums in another order than torch's matmul,
    which on an AMX CPU differs from it in the last bit)."""
    for layer in [*linear4bit_modules(model).values(), *moe_modules(model).values()]:
        layer.use_gemv = False
    head = model.get_output_embeddings()
    if isinstance(head, GemvHead):
        head.use_gemv = False
    return model


def _routed_io(model: torch.nn.Module, ids: torch.Tensor) -> list[tuple[torch.nn.Module, torch.Tensor, ...]]:
    """(layer, rows, top_k_index, output) of every 4-bit Llama 4 experts layer in a forward of ``ids``: the
    block hands its experts each token's routed rows (``hidden * score``) and their experts
    (moe_llama4.route_block)."""
    seen: list = []

    def record(mod: torch.nn.Module, inp: tuple, out: torch.Tensor) -> None:
        assert len(inp) == 3, "the experts were called with routed_in, not the routed rows"
        seen.append((mod, inp[0], inp[1], out.clone()))

    hooks = [m.register_forward_hook(record) for m in moe_modules(model).values()]
    try:
        _logits(model, ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _assert_routed_within_bound(model: torch.nn.Module, ids: torch.Tensor = IDS) -> None:
    """Every 4-bit Llama 4 experts layer of a bf16 forward: each token's routed row (its hidden state
    times its router score, as the block hands it over) within the derived bound of the float64 result
    with the layer's decoded weights (test_routed_block_computes_what_transformers_block_does checks the
    block around it).

    The bound (moe_helpers.experts_reference_and_bound) covers every path a bf16 layer takes, each
    parameter the largest of them: weights decoded to bf16 for F.linear (relative u16 = 2^-8) or by the
    fused GEMV (error_bounds.gemv_arithmetic: float32 decode, or codes rounded to bf16 on AVX512-BF16 and
    tensor cores, whose accumulators may not round to nearest: acc_u 2^-23); float32 sums; gate/up
    rounded to bf16 (or kept float32 in CUDA's fused act(gate) * up); silu in float32 (CUDA: 7 u32)
    rounded to bf16; the product and the down projection each rounded to bf16 (the last once more
    after the routing weight, which is 1 here: the router's scores are in the rows); where the GEMV
    path flushes subnormal inputs and partial sums (AVX512-BF16), ``flush_abs`` per dot product; where
    it holds its inputs as integers per chunk of 64 (AVX2 with bf16 x), ``x_chunk_rel`` per input."""
    from error_bounds import U32, gemv_arithmetic
    from moe_helpers import experts_reference_and_bound

    u16 = 2.0**-8
    seen = _routed_io(model, ids)
    assert len(seen) == LAYERS
    for layer, rows, idx, y in seen:
        assert layer.top_k == 1
        gemv = gemv_arithmetic(rows.device.type, rows.dtype)
        arithmetic = dict(
            weight_rel=max(u16, gemv["weight_rel"]), acc_u=max(U32, gemv["acc_u"]), pre_u=u16,
            silu_u=7 * U32 + u16 + 7 * U32 * u16, h_u=U32 + u16 + U32 * u16, y_u=u16, wy_u=U32, out_u=u16,
            flush_abs=gemv.get("flush_abs", 0.0), x_chunk_rel=gemv.get("x_chunk_rel", 0.0),
        )  # fmt: skip
        assert not ((rows != 0) & (rows.abs() < 2.0**-126)).any()  # no subnormal input in this model
        ones = torch.ones(len(rows), 1, dtype=rows.dtype)
        ref, bound = experts_reference_and_bound(layer, rows.cpu(), idx.cpu(), ones, **arithmetic)
        assert ((y.double().cpu() - ref).abs() <= bound).all()


def _routed_16bit_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The 16-bit per-expert Llama 4 experts layers that run their routed experts only (route_sequential)."""
    return [
        m
        for m in model.modules()
        if type(m).__name__ == "SequentialLlama4TextExperts" and "forward" in vars(m)
    ]


def _assert_16bit_routed_within_bound(model: torch.nn.Module, ids: torch.Tensor = IDS) -> None:
    """Every routed 16-bit Llama 4 experts layer of a bf16 forward of ``ids``: its output on the input it got
    within the derived bound (_experts_bound: two bf16 computations that differ only in their float32
    summation orders; here F.linear on an expert's routed rows against transformers' dense loop's F.linear
    on all the layer's rows, which a BLAS may sum in another order) of that dense loop on the same module
    and input, and within half of it of the float64 result."""
    from types import SimpleNamespace

    layers = _routed_16bit_layers(model)
    assert layers
    seen: dict[int, torch.Tensor] = {}

    def record(mod: torch.nn.Module, args: tuple) -> None:
        seen[id(mod)] = args[0]

    hooks = [m.register_forward_pre_hook(record) for m in layers]
    try:
        _logits(model, ids)
    finally:
        for h in hooks:
            h.remove()
    for m in layers:
        x = seen[id(m)]
        with torch.no_grad():
            routed = m(x).reshape(-1, H).double()
            dense = type(m).forward(m, x).reshape(-1, H).double()
        fused = SimpleNamespace(  # Llama4TextExperts' layout: x @ W, gate then up
            gate_up_proj=torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]).T for e in m]),
            down_proj=torch.stack([e.down_proj.weight.T for e in m]),
        )
        ref, bound = _experts_bound(fused, x)
        assert ((routed - dense).abs() <= bound).all()
        assert ((routed - ref).abs() <= bound / 2).all()


def _assert_computes_like(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    """Our loader (dequantize path) computes what ``ref`` (transformers' per-expert experts, the same
    decoded weights) does. One token: the logits bit for bit (each side runs each expert's weights on
    one row). A prefill: our experts run the routed rows only, where transformers runs every expert on
    every row (zero rows included), and a float32 sum over other row counts may take another order:
    each layer within the derived bound (4-bit: _assert_routed_within_bound; 16-bit:
    _assert_16bit_routed_within_bound)."""
    assert torch.equal(_logits(ours, IDS[:, :1]), _logits(ref, IDS[:, :1]))
    if moe_modules(ours):
        _assert_routed_within_bound(ours)
    elif _routed_16bit_layers(ours):
        _assert_16bit_routed_within_bound(ours)
    else:
        assert torch.equal(_logits(ours), _logits(ref))


def _patched_plain(folder: Path):
    """The plain (dequantized) folder in plain transformers, its experts then rebuilt per expert as
    transformers does for a pre-quantized checkpoint and filled with the same weights: the model whose
    forward our loader and stock bitsandbytes run (F.linear per expert, no bmm)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    fused = {
        n: (m.gate_up_proj.data, m.down_proj.data)
        for n, m in plain.named_modules()
        if hasattr(m, "gate_up_proj")
    }
    patch_for_bnb(plain)
    for n, (gu, dn) in fused.items():
        for e, mlp in enumerate(plain.get_submodule(n)):
            mlp.to_empty(device="cpu")
            mlp.gate_proj.weight.data = gu[e][:, :INTER].T.contiguous()
            mlp.up_proj.weight.data = gu[e][:, INTER:].T.contiguous()
            mlp.down_proj.weight.data = dn[e].T.contiguous()
    return plain


def test_source_on_disk_is_fused_and_the_view_is_per_expert(llama4):
    src = llama4("src")
    local = LocalSource(src)
    view = wrap_if_llama4(local)
    assert isinstance(view, Llama4ExpertsSource)
    infos = {t.name: t for t in view.tensors()}
    assert not [n for n in infos if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    want = _per_expert(_source(src))
    assert set(want) <= set(infos)
    for name, w in want.items():
        assert (infos[name].dtype, infos[name].shape, infos[name].nbytes) == (
            "BF16",
            tuple(w.shape),
            w.numel() * 2,
        )
    # the listing still adds up to the source's bytes
    assert sum(t.nbytes for t in view.tensors()) == sum(t.nbytes for t in local.tensors())
    f = view.open_file("model.safetensors")
    for name, w in want.items():
        got = f.get(name)
        assert got.is_contiguous(), name
        assert torch.equal(got, w), name
    view.close()


def _assert_codes(
    ours: torch.Tensor, w: torch.Tensor, theirs: torch.Tensor, quant_type: str, key: str
) -> None:
    """NF4: bitsandbytes' quantize_4bit bytes exactly. FP4: the project's kernel on the same 2-D weight
    (bnb's CUDA decision tree, pinned by tests/golden), which bitsandbytes' CPU path does not follow
    (torch.bucketize over true midpoints and swapped ±0 codes: ../shared/reference/bnb-4bit.md,
    "Differences" 3, about 0.6% of codes), so against bnb CPU only that share of codes may differ."""
    a, b = ours.view(torch.uint8).reshape(-1), theirs.view(torch.uint8).reshape(-1)
    if quant_type == "nf4":
        assert torch.equal(a, b), key
        return
    packed, _ = kernels.quantize_4bit(w, blocksize=64, quant_type=QuantType.FP4)
    assert torch.equal(a, packed.view(torch.uint8).reshape(-1)), key
    na, nb = torch.stack([a >> 4, a & 15], 1).reshape(-1), torch.stack([b >> 4, b & 15], 1).reshape(-1)
    assert int((na != nb).sum()) <= na.numel() // 50, key


@pytest.mark.parametrize("mode", ["nf4", "fp4"])
def test_quantize_writes_each_expert_as_bnb_quantize_4bit(llama4, mode):
    """Every per-expert record's 4-bit codes (and, not nested, its absmax) are bitsandbytes'
    quantize_4bit of the 2-D nn.Linear weight; nested absmax follows the project's one nesting rule of
    bnb's absmax (bnb's CPU nesting uses an approximate 8-bit lookup: design.md's listed deviation).
    Router 16-bit and skipped, shared expert quantized, no fused tensor left."""
    folder, opts = llama4(mode), MODES[mode]
    records = open_folder(folder).records()
    want = _per_expert(_source(llama4("src")))
    assert not [k for k in records if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    for key, w in want.items():
        rec = records[key]
        assert not isinstance(rec, torch.Tensor), key
        assert tuple(rec.shape) == tuple(w.shape), key
        assert rec.quant_type.label == opts["quant_type"], key
        packed, state = bnb.functional.quantize_4bit(
            w, blocksize=64, compress_statistics=False, quant_type=opts["quant_type"]
        )
        _assert_codes(rec.packed, w, packed, opts["quant_type"], key)
        if opts["double_quant"]:
            codes, nested_absmax, offset = kernels.quantize_nested(state.absmax)
            assert torch.equal(rec.absmax, codes), key
            assert torch.equal(rec.nested.nested_absmax, nested_absmax), key
            assert rec.nested.offset == offset, key
        else:
            assert rec.nested is None, key
            assert torch.equal(rec.absmax, state.absmax), key
    for i in range(LAYERS):
        router = records[f"model.layers.{i}.feed_forward.router.weight"]
        assert isinstance(router, torch.Tensor)
        assert router.dtype == torch.bfloat16
        assert not isinstance(
            records[f"model.layers.{i}.feed_forward.shared_expert.gate_proj.weight"], torch.Tensor
        )
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert "router" in qc["llm_int8_skip_modules"]
    assert not [s for s in qc["llm_int8_skip_modules"] if "experts" in s]
    summary = inspect_path(folder).moe
    assert (summary.experts_quantized, summary.tensors_quantized) == (LAYERS * E, len(want))
    assert not summary.experts_kept
    assert any("stock transformers" in x for x in summary.loaders)


def test_keep_writes_16bit_experts_and_skips_their_modules(llama4):
    folder = llama4("keep")
    records = open_folder(folder).records()
    for key, w in _per_expert(_source(llama4("src"))).items():
        assert isinstance(records[key], torch.Tensor), key
        assert torch.equal(records[key], w), key
    skip = json.loads((folder / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert {f"model.layers.{i}.feed_forward.experts" for i in range(LAYERS)} <= set(skip)
    assert not isinstance(records["model.layers.0.self_attn.q_proj.weight"], torch.Tensor)
    summary = inspect_path(folder).moe
    assert summary.experts_kept
    assert not summary.experts_quantized
    assert any("stock transformers" in x for x in summary.loaders)


def test_keep_warning_says_the_quantized_folder_loads_with_stock_transformers(llama4, tmp_path):
    with pytest.warns(UserWarning, match=r"(?s)routed MoE experts hold .*Llama 4.*stock transformers 5\.x"):
        convert(llama4("src"), tmp_path / "k", progress=False)


@pytest.mark.parametrize("mode", list(MODES))
def test_stock_transformers_loads_the_folder_like_our_loader(llama4, mode):
    """Stock transformers + bitsandbytes (CPU) loads the folder with no missing, unexpected or mismatched
    key, builds its experts per expert (Linear4bit when quantized, nn.Linear with keep), and computes the
    logits of our loader bit for bit: both dequantize each 4-bit weight to the same bf16 values and run
    F.linear (design.md: same decode; our loader on its dequantize path)."""
    folder = llama4(mode)
    model, info = _stock(folder)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    experts = model.model.layers[0].feed_forward.experts
    assert type(experts).__name__ == "SequentialLlama4TextExperts"
    kind = torch.nn.Linear if mode == "keep" else bnb.nn.Linear4bit
    assert all(type(mlp.gate_proj) is kind and type(mlp.down_proj) is kind for mlp in experts)
    ours = _dequant_paths(load_quantized(folder))
    _assert_computes_like(ours, model)


def _experts_bound(experts: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 reference, bound) for two bf16 computations of Llama4TextExperts on ``x`` that differ only
    in their fp32 summation orders (bmm vs per-expert F.linear). Each side sums gate and up over H in fp32
    (absolute error <= gamma_H Σ|x||w|: G, U), rounds them to bf16 (relative error <= u = 2^-8), silu and
    the product once more (<= u each), so h carries <= 3u|h| + 1.1|up| G + |silu(g)| U (to first order;
    silu' <= 1.1); the down projection sums K = I products in fp32 (order error <= gamma_K Σ|h||w|) and
    rounds to bf16 (<= u|y|). Each side is within 3u·S + Σ_k (1.1|up_k| G_k + |silu(g_k)| U_k)|W_kj| +
    gamma_K·S + u|y| of the exact result (S = Σ_k |h_k||W_kj|), so the two differ by at most twice that."""
    e, hidden, inter = experts.gate_up_proj.shape[0], x.shape[-1], experts.gate_up_proj.shape[2] // 2
    gu, dn = experts.gate_up_proj.double(), experts.down_proj.double()
    h = x.double().view(e, -1, hidden)
    g, up = torch.bmm(h, gu).chunk(2, -1)
    act = torch.nn.functional.silu(g) * up
    ref = torch.bmm(act, dn).reshape(-1, hidden)
    s_abs = torch.bmm(act.abs(), dn.abs()).reshape(-1, hidden)
    u, u32 = 2.0**-8, 2.0**-24
    gamma_k = inter * u32 / (1 - inter * u32)
    gamma_h = hidden * u32 / (1 - hidden * u32)
    g_sum, u_sum = (gamma_h * torch.bmm(h.abs(), gu.abs())).chunk(2, -1)
    d_act = 1.1 * up.abs() * g_sum + torch.nn.functional.silu(g).abs() * u_sum
    from_sums = torch.bmm(d_act, dn.abs()).reshape(-1, hidden)
    return ref, 2 * ((3 * u + gamma_k) * s_abs + from_sums + u * ref.abs())


def test_stock_keep_computes_the_source_experts(llama4, tmp_path):
    """keep: the experts stock transformers builds hold the source's bf16 weights exactly; they compute
    what the source's fused Llama4TextExperts computes, up to the fp32 summation order of bmm vs
    per-expert F.linear (bound derived in _experts_bound; in practice equal but for rare 1-ulp bits).
    The whole model's logits equal, bit for bit, those of the same per-expert model on the dequantized
    folder (test_our_loader_equals_the_dequantized_model_and_generates and the stock/ours test)."""
    model, _ = _stock(llama4("keep"))
    want = _per_expert(_source(llama4("src")))
    got = {k: v for k, v in model.state_dict().items() if k in want}
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = transformers.AutoModelForCausalLM.from_pretrained(llama4("src"), dtype=torch.bfloat16).eval()
    x = torch.randn(E * 12, H, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.no_grad():
        for i in range(LAYERS):
            theirs = src.model.layers[i].feed_forward.experts
            assert type(theirs).__name__ == "Llama4TextExperts"
            a, b = model.model.layers[i].feed_forward.experts(x).reshape(-1, H), theirs(x)
            ref, bound = _experts_bound(theirs, x)
            assert ((a.double() - b.double()).abs() <= bound).all()
            assert ((a.double() - ref).abs() <= bound / 2).all()
            assert int((a != b).sum()) <= a.numel() // 100


@pytest.mark.parametrize("mode", list(MODES))
def test_our_loader_equals_the_dequantized_model_and_generates(llama4, mode, tmp_path):
    """load_quantized builds 16-bit experts as transformers does (SequentialLlama4TextExperts) and 4-bit
    ones as one routed-only layer; either computes what the dequantized folder's weights do in
    transformers' per-expert model (_assert_computes_like, dequantize path); the default path generates."""
    folder = llama4(mode)
    plain = tmp_path / "plain"
    dequantize_checkpoint(folder, plain)
    ours = load_quantized(folder)
    experts = ours.model.layers[1].feed_forward.experts
    if mode == "keep":
        assert type(experts).__name__ == "SequentialLlama4TextExperts"
        assert isinstance(experts[0].up_proj, torch.nn.Linear)
    else:  # the routed-only 4-bit experts (converter/loader/moe_llama4.py)
        assert isinstance(experts, QuantLlama4Experts4bit)
        assert (experts.num_experts, experts.hidden_dim, experts.intermediate_dim) == (E, H, INTER)
    out = ours.generate(IDS[:, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)
    _assert_computes_like(_dequant_paths(ours), _patched_plain(plain))


def test_keep_folder_loads_in_stock_transformers_base_model(llama4):
    """Stock ``AutoModel.from_pretrained`` of a ``keep`` folder (Llama4TextModel: module names without the
    ``model.`` prefix) quantized the 16-bit experts, whose skip entries named them with the prefix, and
    failed ("FP4 quantization state not initialized"). The experts modules are listed in both spellings
    (transformers matches a suffix; vLLM the full name): the base model loads them 16-bit and computes
    what the causal LM's base does."""
    folder = llama4("keep")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = transformers.AutoModel.from_pretrained(folder, device_map="cpu")
        full = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    assert type(base.layers[0].feed_forward.experts[0].gate_proj) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(base(IDS).last_hidden_state, full.model(IDS).last_hidden_state)


@pytest.mark.parametrize("mode", ["keep", "nf4"])
def test_model_class_automodel_builds_the_per_expert_layers(llama4, mode):
    """load_quantized(folder, model_class=AutoModel) (Llama4TextModel, no ``model.`` prefix on its module
    names) left the fused Llama4TextExperts in place: the per-expert keys were looked up without the
    base-model prefix, so the 4-bit experts came in as the generic QuantExperts4bit ("forward() missing 2
    required positional arguments: 'top_k_index' and 'top_k_weights'") and the 16-bit ones were bmm-ed
    in the wrong orientation. The base model now gets the layers the causal LM has, and the same states."""
    folder = llama4(mode)
    full = load_quantized(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lm_head unused by the base model
        base = load_quantized(folder, model_class=transformers.AutoModel)
    experts = base.layers[1].feed_forward.experts
    assert type(experts) is type(full.model.layers[1].feed_forward.experts)
    with torch.no_grad():
        assert torch.equal(base(IDS).last_hidden_state, full.model(IDS).last_hidden_state)


@pytest.mark.parametrize("mode", ["nf4", "fp4"])
def test_4bit_experts_read_only_the_routed_experts(llama4, mode):
    """The 4-bit experts run each token's routed expert only (transformers' per-expert module runs all of
    them on every token, the unrouted ones on zero rows): with every expert no token of a one-token step
    is routed to poisoned (NaN scales), the logits are those of the intact model, bit for bit, on the
    default (GEMV) path and the dequantize path. The default path's experts stay within the derived
    bound too."""
    for dequant in (False, True):
        model = load_quantized(llama4(mode))
        if dequant:
            _dequant_paths(model)
        else:
            _assert_routed_within_bound(model)
        want = _logits(model, IDS[:, :1])
        for layer, _, idx, _ in _routed_io(model, IDS[:, :1]):
            routed = int(idx[0, 0])
            for e in range(E):
                if e != routed:
                    layer.absmax[e] = float("nan")
        got = _logits(model, IDS[:, :1])
        assert torch.equal(got, want)
        layer.absmax[routed] = float("nan")  # the routed one is read: the poison shows
        assert torch.isnan(_logits(model, IDS[:, :1])).all()


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("dequant", [False, True], ids=["gemv", "dequantize"])
def test_routed_block_computes_what_transformers_block_does(llama4, dequant, k):
    """A Llama4TextMoe over 4-bit experts hands them each token's routed rows (the router's own top-k,
    ``hidden * score``) instead of the E-fold ``routed_in`` (moe_llama4.route_block): the block's output
    and router logits equal transformers' block forward on the same module bit for bit (one token and a
    prefill; top-1 as Llama 4 ships, and top-2: the two outputs' float32 sum), with fewer ATen ops
    (the router's scores taken from its top-k values: no scatter, ``E``-wide sigmoid or second top-k)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    model = load_quantized(llama4("nf4"))
    if dequant:
        _dequant_paths(model)
    block = model.model.layers[0].feed_forward
    assert "forward" in vars(block)  # route_block's, on the instance
    block.top_k = block.router.top_k = block.experts.top_k = k
    g = torch.Generator().manual_seed(k)
    for tokens in (1, 5):
        x = torch.randn(1, tokens, H, generator=g).bfloat16()
        with torch.no_grad(), Ops() as ours:
            got, got_logits = block(x)
        with torch.no_grad(), Ops() as theirs:
            want, want_logits = type(block).forward(block, x)
        assert torch.equal(got_logits, want_logits)
        assert torch.equal(got, want), (tokens, (got.float() - want.float()).abs().max())
        assert ours.count + 16 <= theirs.count, (ours.count, theirs.count)
        # a router with a hook (LoRA, offload) is called as transformers calls it: the same result
        calls = []
        hook = block.router.register_forward_hook(lambda mod, args, out, calls=calls: calls.append(out))
        with torch.no_grad():
            hooked, hooked_logits = block(x)
        hook.remove()
        assert len(calls) == 1
        assert torch.equal(hooked, want)
        assert torch.equal(hooked_logits, want_logits)


def _keep_experts_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [layer.feed_forward.experts for layer in model.model.layers]


def test_16bit_experts_run_only_the_routed_experts(llama4, dynamo):
    """A keep folder's 16-bit experts (transformers' SequentialLlama4TextExperts: every expert's MLP on
    every token, zero rows included) run each token's routed experts only: with every expert no token is
    routed to poisoned (NaN weights), a one-token step and a prefill give the intact model's logits bit
    for bit, and a routed expert's poison shows; each layer within the derived bound of the dense loop.
    Under torch.compile the module's dense loop runs (the routed forward syncs with the host): fullgraph,
    the logits of the dense loop run eagerly, bit for bit."""
    routed_in: dict[int, torch.Tensor] = {}

    def record(mod: torch.nn.Module, args: tuple) -> None:
        routed_in[id(mod)] = args[0]

    for ids in (IDS[:, :1], IDS[:, :5]):
        model = load_quantized(llama4("keep"))
        layers = _keep_experts_layers(model)
        assert all(type(m).__name__ == "SequentialLlama4TextExperts" for m in layers)
        hooks = [m.register_forward_pre_hook(record) for m in layers]
        want = _logits(model, ids)
        for h in hooks:
            h.remove()
        hit = [routed_in[id(m)].view(E, -1, H).abs().amax(dim=(1, 2)) > 0 for m in layers]
        assert not all(bool(h.all()) for h in hit)  # some experts take no token
        with torch.no_grad():
            for m, h in zip(layers, hit, strict=True):
                for e in (~h).nonzero().flatten().tolist():
                    m[e].down_proj.weight.fill_(float("nan"))
        assert torch.equal(_logits(model, ids), want)
        with torch.no_grad():
            layers[0][int(hit[0].nonzero()[0])].down_proj.weight.fill_(float("nan"))
        assert torch.isnan(_logits(model, ids)).all()
    fresh = load_quantized(llama4("keep")).eval()
    compiled = torch.compile(fresh, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(IDS[:, :5]).logits
    assert dict(dynamo["graph_break"]) == {}
    for m in _keep_experts_layers(fresh):
        del m.forward  # eager with transformers' dense loop, which the compiled graph runs
    assert torch.equal(got, _logits(fresh, IDS[:, :5]))
    _assert_16bit_routed_within_bound(load_quantized(llama4("keep")), IDS[:, :5])


@pytest.mark.parametrize("mode", ["keep", "nf4"])
def test_lora_on_the_attention_trains_through_the_experts(llama4, mode):
    """LoRA on a loaded Llama 4's attention: the loss backpropagates through the MoE blocks (the routed
    4-bit experts' op backward; Llama 4 adds them into its 4-bit shared expert's output in place, which
    autograd refused on the GEMV path) and every adapter gets a finite gradient that is not zero."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_quantized(llama4(mode)), LoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    for name, p in model.named_parameters():
        if "lora_" in name:  # lora_B starts at zero: lora_A's gradients would be zero too
            torch.nn.init.normal_(p, std=0.1)
    model(IDS[:, :6], labels=IDS[:, :6]).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 4 * LAYERS
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("mode", ["keep", "nf4"])
def test_lora_all_linear_leaves_the_router_out_and_trains(llama4, mode):
    """``register_lora(LoraConfig(target_modules="all-linear"), model)`` on a loaded Llama 4 listed each
    ``Llama4Router`` (an nn.Linear subclass returning scores and logits), and the first forward failed
    ("'tuple' object has no attribute 'dtype'"; stock transformers + PEFT the same). The routers are left
    out; the attention, shared experts (and a keep folder's 16-bit experts) get adapters, and a backward
    step gives each a finite gradient, not zero (a keep folder's experts: those routed to)."""
    from peft import LoraConfig, get_peft_model

    from converter.loader.lora import register_lora

    model = load_quantized(llama4(mode))
    config = register_lora(LoraConfig(target_modules="all-linear", r=4), model)
    assert not any(name.endswith("router") for name in config.target_modules)
    assert any(name.endswith("shared_expert.gate_proj") for name in config.target_modules)
    assert any(".experts.0." in name for name in config.target_modules) == (mode == "keep")
    model = get_peft_model(model, config)
    for name, p in model.named_parameters():
        if "lora_" in name:  # lora_B starts at zero: lora_A's gradients would be zero too
            torch.nn.init.normal_(p, std=0.1)
    model(IDS[:, :6], labels=IDS[:, :6]).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    dense = {n: g for n, g in grads.items() if ".experts." not in n}
    assert dense
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in dense.values())
    # a keep folder's experts: the routed ones get gradients, the others none (not run: no gradient)
    experts = [g for n, g in grads.items() if ".experts." in n]
    assert all(g is None or torch.isfinite(g).all() for g in experts)
    assert any(g is not None and g.abs().sum() > 0 for g in experts) == (mode == "keep")


@pytest.mark.parametrize("mode", ["nf4", "fp4"])
def test_loaded_4bit_llama4_saves_the_per_expert_records_and_reloads(llama4, mode, tmp_path):
    """save_pretrained of a loaded 4-bit Llama 4 writes the per-expert records the folder holds (the same
    bytes), which stock transformers + bitsandbytes and load_quantized load again with the same logits."""
    folder = llama4(mode)
    model = load_quantized(folder)
    model.save_pretrained(tmp_path / "saved")
    with safe_open(tmp_path / "saved" / "model.safetensors", "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys() if ".experts." in k}
    src = {k: v for k, v in _source(folder).items() if ".experts." in k}
    assert saved.keys() == src.keys()
    assert all(torch.equal(saved[k], src[k]) for k in src)
    again = _dequant_paths(load_quantized(tmp_path / "saved"))
    assert torch.equal(_logits(again), _logits(_dequant_paths(model)))
    stock, info = _stock(tmp_path / "saved")
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    _assert_computes_like(again, stock)


@pytest.mark.parametrize("mode", list(MODES))
def test_dequantize_fuses_the_experts_back(llama4, mode, tmp_path):
    """dequantize writes the fused gate_up_proj [E, H, 2I] / down_proj [E, I, H] under the original names:
    plain transformers loads the folder with no missing or unexpected key. keep: the source's tensors
    exactly; quantize: bitsandbytes' dequantize_4bit of each record (read as transformers reads it,
    QuantState.from_dict), re-fused."""
    folder, plain = llama4(mode), tmp_path / "plain"
    dequantize_checkpoint(folder, plain)
    src, got = _source(llama4("src")), _source(plain)
    assert got.keys() == src.keys()
    fused = [k for k in src if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    if mode == "keep":
        assert all(torch.equal(got[k], src[k]) for k in fused)
    else:
        with safe_open(folder / "model.safetensors", "pt") as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}
        deq = {}
        for key in _per_expert(src):
            parts = {k[len(key) + 1 :]: v for k, v in raw.items() if k.startswith(key + ".")}
            qs = bnb.functional.QuantState.from_dict(parts, device=torch.device("cpu"))
            deq[key] = bnb.functional.dequantize_4bit(raw[key], qs)
        for i in range(LAYERS):
            m = f"model.layers.{i}.feed_forward.experts"
            gu = torch.stack(
                [
                    torch.cat([deq[f"{m}.{e}.gate_proj.weight"].T, deq[f"{m}.{e}.up_proj.weight"].T], 1)
                    for e in range(E)
                ]
            )
            dn = torch.stack([deq[f"{m}.{e}.down_proj.weight"].T for e in range(E)])
            assert torch.equal(got[f"{m}.gate_up_proj"], gu)
            assert torch.equal(got[f"{m}.down_proj"], dn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, info = transformers.AutoModelForCausalLM.from_pretrained(plain, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_selection_sees_the_per_expert_linears(llama4):
    """The skeleton is built with transformers' own swap: its per-expert nn.Linear are selected like any
    other linear (the fused experts used to be refused)."""
    src = llama4("src")
    view = wrap_if_llama4(LocalSource(src))
    sel = select_tensors(json.loads((src / "config.json").read_text()), view.tensors(), use_transformers=True)
    experts = [k for k in sel.quantize if ".experts." in k]
    assert len(experts) == LAYERS * E * 3
    assert not any(sel.quantize[k].transpose for k in experts)
    assert "feed_forward.router.weight" in " ".join(sel.keep)


def test_an_unknown_module_transformers_patches_is_still_refused(llama4, monkeypatch):
    """Any other module class transformers may list in MODULES_TO_PATCH_FOR_QUANTIZATION: refused."""
    import transformers.quantizers.base as base

    patched = {**base.MODULES_TO_PATCH_FOR_QUANTIZATION, "Llama4TextMLP": {"module_name": None}}
    monkeypatch.setattr(base, "MODULES_TO_PATCH_FOR_QUANTIZATION", patched)
    monkeypatch.setenv(NO_CACHE_ENV, "1")  # the live skeleton, not the facts an earlier test cached
    src = llama4("src")
    view = wrap_if_llama4(LocalSource(src))
    with pytest.raises(SelectionError, match=r"Llama4TextMLP.*quantize this model on load"):
        select_tensors(json.loads((src / "config.json").read_text()), view.tensors(), use_transformers=True)


def test_a_module_transformers_patches_for_other_methods_only_is_not_refused(llama4, monkeypatch):
    """transformers 5.25 lists MiniCPM-5-MoE's experts in MODULES_TO_PATCH_FOR_QUANTIZATION for AWQ only
    (its own _convert_model_for_quantization checks quantization_methods): convert refused every such
    model ("transformers rebuilds ... as other layers"), though a bitsandbytes load keeps the module as it
    is. An entry whose methods leave bitsandbytes out is no reason to refuse."""
    import transformers.quantizers.base as base
    from transformers.utils.quantization_config import QuantizationMethod

    awq_only = {"module_name": None, "quantization_methods": [QuantizationMethod.AWQ]}
    patched = {**base.MODULES_TO_PATCH_FOR_QUANTIZATION, "Llama4TextMLP": awq_only}
    monkeypatch.setattr(base, "MODULES_TO_PATCH_FOR_QUANTIZATION", patched)
    monkeypatch.setenv(NO_CACHE_ENV, "1")
    src = llama4("src")
    view = wrap_if_llama4(LocalSource(src))
    sel = select_tensors(json.loads((src / "config.json").read_text()), view.tensors(), use_transformers=True)
    assert any(".feed_forward.shared_expert." in k for k in sel.quantize)  # the Llama4TextMLP linears


def test_rerun_is_a_noop(llama4):
    folder = llama4("nf4")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = convert(llama4("src"), folder, progress=False, **MODES["nf4"])
    assert again.noop


def test_resume_after_sigkill_gives_the_same_bytes(llama4, tmp_path):
    assert_quantize_resumes_after_sigkill(llama4("src"), tmp_path)


def test_fp8_block_source_composes_with_the_per_expert_view(llama4, tmp_path):
    """A block-FP8 Llama 4 (2-D linears FP8 with weight_scale_inv, experts bf16): the FP8 view decodes the
    linears and passes the fused experts through to the per-expert view, read by rows; the expert records
    are those of the bf16 source's conversion, byte for byte."""
    from moe_helpers import make_fp8_source

    fp8 = make_fp8_source(llama4("src"), tmp_path / "fp8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(fp8, tmp_path / "q", progress=False, **MODES["nf4"])
    got, want = open_folder(tmp_path / "q").records(), open_folder(llama4("nf4")).records()
    assert not [k for k in got if k.endswith(("scale_inv", "experts.gate_up_proj", "experts.down_proj"))]
    experts = [k for k in want if ".experts." in k and k.endswith("_proj.weight")]
    assert len(experts) == LAYERS * E * 3
    for k in experts:
        assert torch.equal(got[k].packed, want[k].packed), k
        assert torch.equal(got[k].absmax, want[k].absmax), k
    assert not isinstance(got["model.layers.0.self_attn.q_proj.weight"], torch.Tensor)


@pytest.mark.parametrize("mode", ["keep", "nf4"])
def test_multimodal_llama4_folder_loads_with_stock_transformers(tmp_path, mode):
    """Llama4ForConditionalGeneration (experts under language_model.model.layers...): both modes load with
    stock transformers + bitsandbytes with no missing or unexpected key, the experts per expert; our
    loader gives the same text logits; dequantize gives back the source's keys for plain transformers."""
    from moe_helpers import make_llama4_multimodal

    src = make_llama4_multimodal(tmp_path / "src")
    out = tmp_path / "q"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(src, out, progress=False, **MODES[mode])
        model, info = transformers.Llama4ForConditionalGeneration.from_pretrained(
            out, device_map="cpu", output_loading_info=True
        )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    experts = model.language_model.model.layers[0].feed_forward.experts
    assert type(experts).__name__ == "SequentialLlama4TextExperts"
    kind = torch.nn.Linear if mode == "keep" else bnb.nn.Linear4bit
    assert type(experts[0].gate_proj) is kind
    skip = json.loads((out / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    if mode == "keep":
        assert "language_model.model.layers.0.feed_forward.experts" in skip
    # (transformers 5.24's Llama4ForConditionalGeneration.forward fails on text alone: the text model)
    ours = _dequant_paths(load_quantized(out))
    _assert_computes_like(ours.language_model, bnb_generic_cpu_path(model.eval()).language_model)
    plain = tmp_path / "plain"
    dequantize_checkpoint(out, plain)
    assert _source(plain).keys() == _source(src).keys()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, info = transformers.Llama4ForConditionalGeneration.from_pretrained(plain, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_automodelforcausallm_of_a_multimodal_folder_builds_the_text_model(tmp_path):
    """load_quantized(multimodal folder, model_class=AutoModelForCausalLM) failed: "transformers could not
    build Llama4ForCausalLM from config.json (AttributeError: 'Llama4Config' object has no attribute
    'pad_token_id')", while transformers' AutoModelForCausalLM.from_pretrained builds Llama4ForCausalLM
    from the text_config (auto_factory). It now does the same, as model_class=Llama4ForCausalLM does."""
    from moe_helpers import make_llama4_multimodal

    from converter.loader.estimate import estimate
    from converter.loader.footprint import memory_by_device

    src = make_llama4_multimodal(tmp_path / "src")
    out = tmp_path / "q"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experts kept; vision tensors unused by the text model
        convert(src, out, progress=False, **MODES["nf4"])
        text = load_quantized(out, model_class=transformers.Llama4ForCausalLM)
        auto = load_quantized(out, model_class=transformers.AutoModelForCausalLM)
        planned = estimate(out, "cpu", model_class=transformers.AutoModelForCausalLM)[1]
    assert planned == memory_by_device(auto)
    assert type(auto) is transformers.Llama4ForCausalLM
    assert isinstance(auto.model.layers[0].feed_forward.experts, QuantLlama4Experts4bit)
    with torch.no_grad():
        assert torch.equal(auto(IDS).logits, text(IDS).logits)


@pytest.mark.parametrize("mode", ["keep", "nf4"])
def test_stock_automodelforcausallm_loads_a_multimodal_folder(mode, tmp_path):
    """Stock ``AutoModelForCausalLM.from_pretrained`` of a multimodal Llama 4 folder builds Llama4ForCausalLM
    (module names ``model.layers.…``, ``lm_head``): the skip list named only ``language_model.…``, so
    transformers made the 16-bit head (and with ``keep`` the 16-bit experts) Linear4bit with no state and
    the forward failed. The head and experts modules are listed as each class names them; the text model
    computes what the multimodal class's language model does."""
    from moe_helpers import make_llama4_multimodal

    src = make_llama4_multimodal(tmp_path / "src")
    out = tmp_path / "q"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vision tensors unused by the text model
        convert(src, out, progress=False, **MODES[mode])
        text = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
        full = transformers.Llama4ForConditionalGeneration.from_pretrained(out, device_map="cpu")
    assert type(text.lm_head) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(text(IDS).logits, full.language_model(IDS).logits)


@pytest.mark.parametrize("mode", ["keep", "nf4"])
def test_model_dequantize_restores_the_fused_experts(llama4, mode, tmp_path):
    """model.dequantize() on a loaded Llama 4: transformers' fused Llama4TextExperts again, with the logits
    of the dequantized folder in plain transformers, bit for bit (the same weights, the same modules); the
    model saves a plain checkpoint that plain transformers loads with no missing or unexpected key."""
    folder, plain = llama4(mode), tmp_path / "plain"
    dequantize_checkpoint(folder, plain)
    model = load_quantized(folder)
    model.dequantize()
    assert not linear4bit_modules(model)
    experts = model.model.layers[0].feed_forward.experts
    assert type(experts).__name__ == "Llama4TextExperts"
    assert experts.gate_up_proj.shape == (E, H, 2 * INTER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.AutoModelForCausalLM.from_pretrained(plain, dtype=torch.bfloat16).eval()
    assert torch.equal(_logits(model), _logits(ref))
    model.save_pretrained(tmp_path / "saved")
    assert _source(tmp_path / "saved").keys() == _source(llama4("src")).keys()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again, info = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "saved", dtype=torch.bfloat16, output_loading_info=True
        )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert torch.equal(_logits(again.eval()), _logits(ref))


def test_quantize_with_a_layers_experts_skipped_loads_everywhere(llama4, tmp_path):
    """--skip of one layer's experts with quantize: those stay 16-bit and are named in the skip list, so
    stock transformers builds them nn.Linear next to the other layer's Linear4bit experts (each expert
    is its own linear in Llama 4: no mixed-layer warning); our loader gives the same logits."""
    out = tmp_path / "q"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert(
            llama4("src"), out, progress=False, skip=["*.layers.1.feed_forward.experts.*"], **MODES["nf4"]
        )
    assert not [w for w in caught if "keep some experts 16-bit" in str(w.message)]
    model, info = _stock(out)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(model.model.layers[0].feed_forward.experts[0].gate_proj) is bnb.nn.Linear4bit
    assert type(model.model.layers[1].feed_forward.experts[0].gate_proj) is torch.nn.Linear
    ours = _dequant_paths(load_quantized(out))
    assert isinstance(ours.model.layers[0].feed_forward.experts, QuantLlama4Experts4bit)
    assert type(ours.model.layers[1].feed_forward.experts).__name__ == "SequentialLlama4TextExperts"
    assert torch.equal(_logits(model, IDS[:, :1]), _logits(ours, IDS[:, :1]))
    seen = _routed_io(ours, IDS)
    assert [layer for layer, *_ in seen] == [ours.model.layers[0].feed_forward.experts]
    summary = inspect_path(out).moe
    assert (summary.experts_quantized, summary.experts_kept) == (E, E)  # layer 0's, layer 1's
    assert (summary.tensors_quantized, summary.tensors_kept) == (E * 3, E * 3)
    assert any("stock transformers" in x for x in summary.loaders)


@pytest.mark.parametrize("expert", [0, E - 1])
def test_quantize_with_one_expert_skipped_loads_like_stock_transformers(llama4, tmp_path, expert):
    """--skip of one expert of a layer with quantize: that expert stays 16-bit (named in the skip list),
    stock transformers builds it nn.Linear beside the layer's Linear4bit experts, and convert and inspect
    name load_quantized as a loader (Llama 4's experts are each their own linear). load_quantized refused
    the layer ("mixes 4-bit and 16-bit experts"; for expert 0 an AttributeError): it now keeps that
    layer's per-expert modules, 4-bit experts as our Linear4bit, and gives stock transformers' logits."""
    from converter.loader.module import QuantLinear4bit

    out = tmp_path / "q"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(
            llama4("src"), out, progress=False, skip=[f"*.layers.1.feed_forward.experts.{expert}.*"],
            **MODES["nf4"],
        )  # fmt: skip
    assert any("load_quantized" in x for x in inspect_path(out).moe.loaders)
    model, info = _stock(out)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(model.model.layers[1].feed_forward.experts[expert].gate_proj) is torch.nn.Linear
    ours = _dequant_paths(load_quantized(out))
    assert isinstance(ours.model.layers[0].feed_forward.experts, QuantLlama4Experts4bit)
    mixed = ours.model.layers[1].feed_forward.experts
    assert type(mixed).__name__ == "SequentialLlama4TextExperts"
    for e in range(E):
        assert isinstance(mixed[e].gate_proj, QuantLinear4bit) == (e != expert), e
    assert torch.equal(_logits(model, IDS[:, :1]), _logits(ours, IDS[:, :1]))
    ours.save_pretrained(tmp_path / "saved")
    again = _dequant_paths(load_quantized(tmp_path / "saved"))
    assert torch.equal(_logits(again, IDS[:, :1]), _logits(ours, IDS[:, :1]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("mode", ["keep", "nf4"])
def test_on_cuda_every_4bit_layer_is_within_the_gemv_bound_and_stock_bitsandbytes_loads(llama4, mode):
    """Llama 4 on the GPU: every 4-bit linear of a real forward (8 tokens: the fused GEMV) within the bound
    of the kernel's arithmetic against float64 with the exact decode, the routed 4-bit experts within
    theirs (_assert_routed_within_bound);
    greedy generate() runs; stock transformers + bitsandbytes loads the same folder on the GPU with no
    missing or unexpected key and generates too. (End-to-end logits have no derivable tolerance.)"""
    from error_bounds import dot_bound, gemv_arithmetic, worst_ratio

    folder = llama4(mode)
    ours = load_quantized(folder, device="cuda")
    layers = linear4bit_modules(ours)
    seen = []  # outputs cloned: Llama4TextMoe adds the routed experts into the shared expert's in place
    hooks = [
        m.register_forward_hook(
            lambda mod, inp, out, name=name: seen.append((name, mod, inp[0], out.clone()))
        )
        for name, m in layers.items()
    ]
    try:
        _logits(ours, IDS[:, :8].cuda())
    finally:
        for h in hooks:
            h.remove()
    assert {name for name, *_ in seen} == set(layers)
    assert not any(".experts.0." in name for name in layers)  # 16-bit (keep) or one routed layer (nf4)
    if mode == "nf4":
        assert all(m.packed.is_cuda for m in moe_modules(ours).values())
        _assert_routed_within_bound(ours, IDS[:, :8].cuda())  # 8 rows: the grouped decode kernels
    for name, layer, x, y in seen:
        x2d = x.reshape(-1, x.shape[-1])
        w32 = layer.dequantize(torch.float32)
        ref, bound = dot_bound(
            x2d, w32, out_dtype=x.dtype, bias=layer.bias, **gemv_arithmetic("cuda", x.dtype)
        )
        assert worst_ratio(y.reshape(ref.shape), ref, bound) <= 1.0, name
    with torch.no_grad():
        assert ours.generate(IDS[:, :4].cuda(), max_new_tokens=5, do_sample=False).shape == (1, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock, info = transformers.AutoModelForCausalLM.from_pretrained(
            folder, device_map="cuda", output_loading_info=True
        )
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    with torch.no_grad():
        assert stock.generate(IDS[:, :4].cuda(), max_new_tokens=5, do_sample=False).shape == (1, 9)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_dequantize_never_builds_a_fused_experts_tensor_whole(llama4, mode, dtype, tmp_path, monkeypatch):
    """dequantize writes gate_up_proj [E, H, 2I] / down_proj [E, I, H] expert by expert: no tensor torch
    allocates while it makes and writes one is as large as it, the largest is one expert's block (it built
    each fused tensor whole: 21.5 GB for one of Maverick's gate_up_proj in bf16)."""
    size = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    largest = largest_fresh_tensors_of_dequantize(llama4(mode), tmp_path / "plain", monkeypatch, dtype=dtype)
    for i in range(LAYERS):
        m = f"model.layers.{i}.feed_forward.experts"
        for key, numel in ((f"{m}.gate_up_proj", E * H * 2 * INTER), (f"{m}.down_proj", E * INTER * H)):
            assert largest[key][0] < numel * size, (key, largest[key])
            assert largest[key][0] <= numel // E * size, (key, largest[key])


@pytest.mark.parametrize("mode", list(MODES))
def test_dequantize_streamed_bytes_equal_the_whole_tensor_build(llama4, mode, tmp_path, monkeypatch):
    """The fused tensors written expert by expert: the same file, byte for byte, as each fused tensor
    built whole and written at once (bf16, float16 with its overflow check, float32)."""
    for dtype in ("bfloat16", "float16", "float32"):
        assert_streamed_bytes_equal_whole_build(llama4(mode), tmp_path / dtype, monkeypatch, dtype=dtype)


def _keep_folder_with(llama4, tmp_path: Path, name: str, values: dict[tuple[int, ...], float]) -> Path:
    """A ``keep`` folder converted from the Llama 4 source with ``values`` put into its tensor ``name``."""
    from safetensors.torch import save_file

    src = tmp_path / "src"
    shutil.copytree(llama4("src"), src)
    tensors = _source(src)
    for index, value in values.items():
        tensors[name][index] = value
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    folder = tmp_path / "keep"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(src, folder, progress=False)
    return folder


def test_dequantize_to_float16_names_fused_experts_the_cast_makes_inf(llama4, tmp_path):
    """A Llama 4 expert weight past float16's range: dequantize --dtype float16 names the fused tensor it
    writes (the check decoded a fused tensor as if it were a quantized record: AttributeError)."""
    name = "model.layers.0.feed_forward.experts.gate_up_proj"
    folder = _keep_folder_with(llama4, tmp_path, name, {(1, 3, 5): 1.0e5})
    notes = []
    result = dequantize_checkpoint(folder, tmp_path / "plain", dtype="float16", warn=notes.append)
    assert notes == result.notes
    assert len(notes) == 1
    assert notes[0].startswith(
        f"tensor {name!r} holds 1 value(s) past float16's range (|w| up to 9.984e+04)"
    )  # 1e5 in bf16


def test_dequantize_to_float16_counts_the_overflow_over_every_expert_in_one_note(llama4, tmp_path):
    """The fused tensor is written expert by expert; the float16 overflow check counts the values of every
    expert's block into one note naming the fused tensor, with the largest |w| of them all."""
    name = "model.layers.1.feed_forward.experts.down_proj"
    values = {(0, 3, 5): 1.0e5, (2, 7, 1): -2.0e5, (3, 0, 0): 7.0e4}
    folder = _keep_folder_with(llama4, tmp_path, name, values)
    notes = []
    dequantize_checkpoint(folder, tmp_path / "plain", dtype="float16", warn=notes.append)
    largest = float(torch.tensor(-2.0e5, dtype=torch.bfloat16).abs())
    assert len(notes) == 1, notes
    assert notes[0].startswith(
        f"tensor {name!r} holds 3 value(s) past float16's range (|w| up to {largest:.4g})"
    )
    written = _source(tmp_path / "plain")[name]
    assert int(torch.isinf(written).sum()) == 3


def test_dequantize_refuses_an_expert_of_other_shapes_than_the_fused_tensor(llama4, tmp_path):
    """An expert whose weights make a block of another shape than expert 0's (the per-expert tensors of an
    edited folder) is refused, naming the fused tensor: the fused tensor is written expert by expert."""
    from safetensors.torch import save_file

    folder = tmp_path / "keep"
    shutil.copytree(llama4("keep"), folder)
    with safe_open(folder / "model.safetensors", "pt") as f:  # as another tool writes it: no metadata
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    m = "model.layers.1.feed_forward.experts"
    for p in ("gate", "up"):  # [I, H] -> [H, I]: the same elements, another block
        tensors[f"{m}.2.{p}_proj.weight"] = tensors[f"{m}.2.{p}_proj.weight"].T.contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match=rf"tensor '{m}.gate_up_proj': expert 2's weights make a block"):
        dequantize_checkpoint(folder, tmp_path / "plain", verify=False)


def test_the_model_card_of_a_quantized_llama4_shows_the_transformers_snippet(llama4):
    """The MoE card said only load_quantized loads 4-bit experts, with an empty "Not:" list: a Llama 4
    folder's per-expert records load with stock transformers + bitsandbytes too, and its card shows that
    snippet; a Qwen3-MoE-style card keeps its "Not:" list and has none."""
    from converter.tools.push import build_model_card

    card = build_model_card(llama4("nf4"), "me/tiny-llama4-nf4", revision="v1")
    assert "## Load with transformers (needs `bitsandbytes`)" in card
    assert (
        'model = AutoModelForCausalLM.from_pretrained("me/tiny-llama4-nf4", revision="v1", device_map="auto")'
        in card
    )
    assert "Not:" not in card
    assert 'load_quantized("me/tiny-llama4-nf4", revision="v1")' in card


@pytest.mark.parametrize("mode", ["keep", "nf4"])
def test_torch_save_and_load_of_a_loaded_model(llama4, mode):
    """torch.save / torch.load of a loaded Llama 4 model: the routed forwards the loader puts on the
    experts (keep: SequentialLlama4TextExperts) and MoE blocks (4-bit) were bound methods, which pickle
    as getattr(module, function name); transformers' classes have no such attribute, and torch.load
    failed ("'Llama4TextMoe' object has no attribute '_routed_block_forward'"). The loaded copy runs
    its own routed forward, bound to itself, with the same logits."""
    import io

    model = load_quantized(llama4(mode))
    want = _logits(model, IDS)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copy = torch.load(buffer, weights_only=False)
    routed = [(n, m) for n, m in copy.named_modules() if "forward" in vars(m)]
    assert routed
    assert all(vars(m)["forward"].args[0] is m for _, m in routed)
    assert torch.equal(_logits(copy, IDS), want)
