"""gpt-oss: fused biased experts on disk, written as unsloth's per-expert records with --moe-experts quantize.

gpt-oss stores a layer's experts as ``gate_up_proj [E, H, 2I]`` (``x @ W``, gate/up interleaved),
``gate_up_proj_bias [E, 2I]``, ``down_proj [E, I, H]`` and ``down_proj_bias [E, H]``. ``--moe-experts
quantize`` writes ``experts.gate_up_projs.<e>.weight = gate_up_proj[e].T`` and ``down_projs.<e>.weight
= down_proj[e].T`` as bnb 4-bit records (unsloth's names, converter/sources/gpt_oss.py), their biases
16-bit; load_quantized runs them in 4 bit (converter/loader/moe_gpt_oss.py), and ``dequantize`` fuses
them back. ``keep`` (the default) leaves the fused 16-bit tensors as before.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import transformers
from click.testing import CliRunner
from moe_helpers import (
    CUDA_SILU_U,
    GPT_OSS,
    assert_cuda_graph_replays_like_eager,
    assert_quantize_resumes_after_sigkill,
    assert_streamed_bytes_equal_whole_build,
    down_code_step_ratios,
    experts_reference_and_bound,
    grouped_cuda_decode,
    largest_fresh_tensors_of_dequantize,
    make_gpt_oss,
)
from safetensors import safe_open

from converter.cli import cli
from converter.kernels import bnb4bit as kernels
from converter.loader import moe_cuda
from converter.loader.dequantize import dequantize_checkpoint
from converter.loader.model import linear4bit_modules, load_quantized
from converter.loader.moe import moe_modules
from converter.loader.moe_gpt_oss import QuantGptOssExperts4bit
from converter.sources.gpt_oss import GptOssExpertsSource, wrap_if_gpt_oss
from converter.sources.local import LocalSource
from converter.tools.inspection import inspect_path
from converter.writer.pipeline import convert
from formats.reader import open_folder

E, H, INTER, LAYERS = GPT_OSS["num_local_experts"], GPT_OSS["hidden_size"], GPT_OSS["intermediate_size"], 2
IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64, 11, 90, 3, 45]])


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory: pytest.TempPathFactory):
    """gpt_oss(name) -> folder: "src" (bf16), "q" (--moe-experts quantize, CLI), "keep", "plain" (q
    dequantized)."""
    root = tmp_path_factory.mktemp("gpt_oss")
    made: dict[str, Path] = {"src": make_gpt_oss(root / "src")}

    def get(name: str) -> Path:
        if name not in made:
            out = root / name
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if name == "q":
                    r = CliRunner().invoke(
                        cli, ["convert", str(made["src"]), str(out), "--moe-experts", "quantize", "-q"]
                    )
                    assert r.exit_code == 0, r.output
                elif name == "keep":
                    convert(made["src"], out, progress=False)
                elif name == "plain":
                    dequantize_checkpoint(get("q"), out)
            made[name] = out
        return made[name]

    return get


def _source(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _per_expert(src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The per-expert tensors the converter writes, from the fused source tensors."""
    out = {}
    for i in range(LAYERS):
        p = f"model.layers.{i}.mlp.experts"
        for e in range(E):
            out[f"{p}.gate_up_projs.{e}.weight"] = src[f"{p}.gate_up_proj"][e].T.contiguous()
            out[f"{p}.gate_up_projs.{e}.bias"] = src[f"{p}.gate_up_proj_bias"][e]
            out[f"{p}.down_projs.{e}.weight"] = src[f"{p}.down_proj"][e].T.contiguous()
            out[f"{p}.down_projs.{e}.bias"] = src[f"{p}.down_proj_bias"][e]
    return out


def _dequant_paths(model: torch.nn.Module) -> torch.nn.Module:
    for layer in [*linear4bit_modules(model).values(), *moe_modules(model).values()]:
        layer.use_gemv = False
    return model


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _eager(folder: Path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.GptOssForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, **kwargs).eval()


def test_view_shows_each_expert_as_its_linear_weight(gpt_oss):
    """The view lists unsloth's per-expert tensors (weights [out, in], rows of gate_up interleaved as on
    disk) in place of the fused ones, each read as its expert's block, contiguous; sizes add up."""
    src = gpt_oss("src")
    local = LocalSource(src)
    view = wrap_if_gpt_oss(local)
    assert isinstance(view, GptOssExpertsSource)
    want = _per_expert(_source(src))
    infos = {t.name: t for t in view.tensors()}
    assert not [n for n in infos if n.endswith(("_proj", "_proj_bias"))]
    for name, w in want.items():
        assert infos[name].shape == tuple(w.shape), name
    assert sum(t.nbytes for t in view.tensors()) == sum(t.nbytes for t in local.tensors())
    f = view.open_file("model.safetensors")
    for name, w in want.items():
        got = f.get(name)
        assert got.is_contiguous(), name
        assert torch.equal(got, w), name
    view.close()


def test_quantize_writes_each_expert_as_bnb_quantize_4bit(gpt_oss):
    """Every per-expert weight is a bnb record whose codes are bitsandbytes' quantize_4bit of the 2-D
    nn.Linear weight (gate_up_proj[e].T, down_proj[e].T) and whose nested absmax follows the project's
    nesting rule of bnb's absmax (design.md: bnb's CPU nesting is a listed deviation); biases, routers,
    norms, embeddings and head 16-bit, the router in the skip list; no fused tensor left."""
    folder = gpt_oss("q")
    records = open_folder(folder).records()
    src = _source(gpt_oss("src"))
    want = _per_expert(src)
    assert not [k for k in records if k.endswith(("_proj", "_proj_bias"))]
    for key, w in want.items():
        rec = records[key]
        if key.endswith(".bias"):
            assert isinstance(rec, torch.Tensor), key
            assert rec.dtype == torch.bfloat16, key
            assert torch.equal(rec, w), key
            continue
        assert not isinstance(rec, torch.Tensor), key
        assert tuple(rec.shape) == tuple(w.shape), key
        assert rec.quant_type.label == "nf4", key
        assert rec.blocksize == 64, key
        packed, state = bnb.functional.quantize_4bit(
            w, blocksize=64, compress_statistics=False, quant_type="nf4"
        )
        assert torch.equal(rec.packed.view(torch.uint8).reshape(-1), packed.view(torch.uint8).reshape(-1)), (
            key
        )
        codes, nested_absmax, offset = kernels.quantize_nested(state.absmax)
        assert torch.equal(rec.absmax, codes), key
        assert torch.equal(rec.nested.nested_absmax, nested_absmax), key
        assert rec.nested.offset == offset, key
    for k, v in src.items():
        if ".experts." not in k and not k.endswith(("_proj.weight",)):
            assert isinstance(records[k], torch.Tensor), k
            assert torch.equal(records[k], v), k
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert "router" in qc["llm_int8_skip_modules"]
    assert "lm_head" in qc["llm_int8_skip_modules"]


def test_summary_card_and_bits_name_the_loaders(gpt_oss):
    """inspect: every expert 4-bit, read by load_quantized and unsloth, not by stock transformers nor
    vLLM; far fewer bits per parameter than the keep folder; the model card says the same."""
    from converter.tools.push import build_model_card

    q, keep = inspect_path(gpt_oss("q")), inspect_path(gpt_oss("keep"))
    s = q.moe
    assert (s.experts_quantized, s.tensors_quantized) == (LAYERS * E, LAYERS * E * 2)  # experts, records
    assert not s.experts_kept
    assert s.layout == "experts quantized (per-expert bnb nf4 records)"
    assert any("load_quantized" in x for x in s.loaders)
    assert any("unsloth" in x for x in s.loaders)
    assert any(x.startswith("stock transformers") for x in s.not_loaders)
    assert any("vLLM" in x and "25653" in x for x in s.not_loaders)
    assert keep.moe.experts_kept
    assert not keep.moe.experts_quantized
    assert q.bits_per_param < keep.bits_per_param / 2
    card = build_model_card(gpt_oss("q"), "me/tiny-gpt-oss-nf4")
    assert "experts.gate_up_projs.<e>.weight" in card
    assert "unsloth" in card
    assert "vllm#25653" in card


def test_keep_writes_the_fused_16bit_tensors_as_before(gpt_oss):
    """--moe-experts keep (the default): the fused tensors 16-bit and unchanged, no per-expert records,
    and the folder loads with load_quantized (transformers' own GptOssExperts)."""
    folder = gpt_oss("keep")
    records = open_folder(folder).records()
    src = _source(gpt_oss("src"))
    assert not [k for k in records if "_projs." in k]
    for k in [k for k in src if ".experts." in k]:
        assert isinstance(records[k], torch.Tensor), k
        assert torch.equal(records[k], src[k]), k
    model = load_quantized(folder)
    assert not moe_modules(model)
    assert type(model.model.layers[0].mlp.experts).__name__ == "GptOssExperts"


def test_logits_bit_identical_to_dequantized_model(gpt_oss):
    """On the dequantize path the 4-bit experts compute transformers' GptOssExperts loop (x @ W rounded,
    then + bias; the clamped interleaved gate) on the decoded weights: the logits equal those of the
    dequantized bf16 folder loaded by transformers' eager experts, bit for bit (prefill and decode); the
    clamp binds for these weights; greedy generate gives the same tokens."""
    ours = _dequant_paths(load_quantized(gpt_oss("q")))
    mods = moe_modules(ours)
    assert len(mods) == LAYERS
    assert all(type(m) is QuantGptOssExperts4bit for m in mods.values())
    ref = _eager(gpt_oss("plain"), experts_implementation="eager")
    assert torch.equal(_logits(ours), _logits(ref))
    assert torch.equal(_logits(ours, IDS[:, :1]), _logits(ref, IDS[:, :1]))
    # the clamp binds: some gate/up outputs of the routed experts are past the limit
    experts = ref.model.layers[0].mlp.experts
    x = torch.randn(12, H, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    gate_up = x @ experts.gate_up_proj[0] + experts.gate_up_proj_bias[0]
    assert (gate_up.abs() > GPT_OSS["swiglu_limit"]).any()
    want = ref.generate(IDS[:, :4], max_new_tokens=6, do_sample=False)
    assert torch.equal(ours.generate(IDS[:, :4], max_new_tokens=6, do_sample=False), want)


@pytest.mark.parametrize("tokens", [3, 12], ids=["decode", "prefill"])
def test_default_path_within_the_derived_float32_bound(gpt_oss, tokens):
    """The default path (grouped GEMV for decode, per-expert GEMV or dequantize + matmul in prefill),
    computing in float32, stays within experts_reference_and_bound's derived bound of the exact result
    on the decoded weights (biases, clamped gate); so does a default-path model's generate run."""
    m = next(iter(moe_modules(load_quantized(gpt_oss("q"))).values()))
    m.compute_dtype = torch.float32
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=g) * 2
    idx = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(tokens)])
    w = torch.rand(tokens, 2, generator=g)
    with torch.no_grad():
        got = m(x, idx, w).double()
    ref, bound = experts_reference_and_bound(m, x, idx, w)
    assert ((got - ref).abs() <= bound).all()
    assert (got - ref).abs().max() > 0 or tokens > 8  # the GEMV path ran (not the exact reference)


def test_one_down_code_step_leaves_the_derived_bound(gpt_oss):
    """The derived bound is not vacuous: with one down weight of a routed expert moved by one 4-bit code
    step, the output leaves it (decode, the grouped GEMV), where the unchanged layer's stays inside."""
    m = next(iter(moe_modules(load_quantized(gpt_oss("q"))).values()))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, H, generator=g) * 2
    idx = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(3)])
    within, outside = down_code_step_ratios(m, x, idx, torch.rand(3, 2, generator=g))
    assert within <= 1 < outside


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("tokens", [3, 12], ids=["decode", "prefill"])
def test_on_cuda_within_the_derived_float32_bound_and_generates(gpt_oss, tokens):
    """The 4-bit gpt-oss experts on the GPU (decode: one grouped GEMV per projection over the (token,
    slot) rows; prefill: the per-expert loop, the CUDA GEMV for up to 8 tokens per expert, else
    dequantize + matmul; float32 compute without TF32) within the same derived bound as on the CPU,
    torch's CUDA sigmoid allowed CUDA_SILU_U (exp, add, divide on the device: the MoE CUDA tests' silu
    allowance); greedy generate() runs on the GPU."""
    model = load_quantized(gpt_oss("q"), device="cuda")
    m = next(iter(moe_modules(model).values()))
    assert m.packed.is_cuda
    assert m.gate_up_bias.is_cuda
    loaded, m.compute_dtype = m.compute_dtype, torch.float32
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=g) * 2
    idx = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(tokens)])
    w = torch.rand(tokens, 2, generator=g)
    with torch.no_grad():
        got = m(x.cuda(), idx.cuda(), w.cuda()).double().cpu()
    ref, bound = experts_reference_and_bound(m, x, idx, w, silu_u=CUDA_SILU_U)
    assert ((got - ref).abs() <= bound).all()
    m.compute_dtype = loaded
    out = model.generate(IDS[:, :4].cuda(), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)


def _cuda_routing(m, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=g) * 2
    idx = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(tokens)])
    w = torch.rand(tokens, 2, generator=g)
    return x.cuda(), idx.cuda(), w.cuda()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not moe_cuda.available(), reason="no CUDA MoE kernels")
def test_cuda_decode_is_grouped_without_host_sync_and_replays_in_a_cuda_graph(gpt_oss, monkeypatch):
    """CUDA decode: both projections through ``moe_cuda.grouped_gemv`` (one launch each over every
    (token, slot) row, the expert ids read on the device), the biases gathered by id, the clamped gate,
    the weighted sum over slots: no per-expert loop, no host synchronisation (torch's sync debug mode
    raises on one), within the derived float32 bound of the exact result on the decoded weights; captured
    once in a CUDA graph, each replay with other tokens and experts equals an eager call, bit for bit."""
    m = next(iter(moe_modules(load_quantized(gpt_oss("q"), device="cuda")).values()))
    m.compute_dtype = torch.float32
    x, idx, w = _cuda_routing(m, 3, 0)
    got, launches = grouped_cuda_decode(m, x, idx, w, monkeypatch)
    assert launches == [2 * INTER, H]
    ref, bound = experts_reference_and_bound(m, x.cpu(), idx.cpu(), w.cpu(), silu_u=CUDA_SILU_U)
    assert ((got.double().cpu() - ref).abs() <= bound).all()

    assert_cuda_graph_replays_like_eager(m, lambda seed: _cuda_routing(m, 2, seed))


def test_compiles_fullgraph_with_the_eager_logits(gpt_oss, dynamo):
    """torch.compile(model, fullgraph=True) of a loaded gpt-oss model: each 4-bit experts layer is one
    ``quantize_model::moe_experts_4bit_gated_keyed`` node (its codes the graph's one input from the layer;
    the scales, code table, biases and gate read by key), no graph break, and the compiled logits equal
    the eager ones bit for bit (aot_eager runs the ATen ops eager runs and the op's implementation is the
    eager forward): decode-sized (3 tokens: the grouped GEMV) and prefill (12: the per-expert loop)."""
    from dynamo_helpers import trace_guards

    model = load_quantized(gpt_oss("q")).eval()
    _, ops, _ = trace_guards(model, IDS[:, :3])
    assert dict(dynamo["graph_break"]) == {}
    assert sum(op.startswith("quantize_model.moe_experts_4bit_gated_keyed") for op in ops) == LAYERS
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for ids in (IDS[:, :3], IDS):
        assert torch.equal(_logits(compiled, ids), _logits(model, ids))
    assert dict(dynamo["graph_break"]) == {}


def test_generate_static_cache_fullgraph_gives_the_eager_tokens(gpt_oss):
    """generate() with a StaticCache and the decode step through torch.compile(fullgraph=True) (aot_eager,
    in a child process: tests/moe/test_moe_compile_generate.py's script): one graph, no break, the eager
    tokens and logits on the first compiled call and again on the reset cache."""
    from test_moe_compile_generate import _run

    got = _run(gpt_oss("q"), "aot_eager")
    assert got["tokens_equal"] == [True, True, True]
    assert got["max_diff"] == 0.0


def test_generate_on_the_default_path_and_counts(gpt_oss):
    """generate on the default path; num_parameters() counts the experts' weights and biases as
    transformers counts the bf16 model's, and the footprint is far below it."""
    model = load_quantized(gpt_oss("q"))
    out = model.generate(IDS[:, :4], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 10)
    ref = _eager(gpt_oss("src"))
    assert model.num_parameters() == ref.num_parameters()
    assert model.get_memory_footprint() < ref.get_memory_footprint() / 2


def test_save_pretrained_writes_the_same_records(gpt_oss, tmp_path):
    """save_pretrained of the loaded model writes the folder's tensors again (every key, equal), and that
    folder loads with the same logits; load_state_dict of the model's state_dict restores a layer."""
    model = load_quantized(gpt_oss("q"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "saved")
    a, b = _source(gpt_oss("q")), _source(tmp_path / "saved")
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = _dequant_paths(load_quantized(tmp_path / "saved"))
    assert torch.equal(_logits(again), _logits(_dequant_paths(model)))
    # load_state_dict reads the same records back into a layer whose codes and biases were overwritten
    experts = moe_modules(again)["model.layers.0.mlp.experts"]
    experts.packed.zero_()
    experts.gate_up_bias.zero_()
    assert not torch.equal(_logits(again), _logits(model))
    result = again.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys
    assert not result.unexpected_keys
    assert torch.equal(_logits(again), _logits(model))


def test_dequantize_writes_the_fused_tensors_transformers_loads(gpt_oss):
    """`quantize-model dequantize`: gate_up_proj [E, H, 2I] / down_proj [E, I, H] (the decoded records,
    transposed back) and the biases, which plain transformers loads with no missing or unexpected key."""
    plain = gpt_oss("plain")
    tensors = _source(plain)
    q = load_quantized(gpt_oss("q"))
    for i in range(LAYERS):
        p = f"model.layers.{i}.mlp.experts"
        m = q.get_submodule(p)
        assert tensors[f"{p}.gate_up_proj"].shape == (E, H, 2 * INTER)
        assert tensors[f"{p}.down_proj"].shape == (E, INTER, H)
        for e in range(E):
            gu, dn = m.expert_weights(e, torch.bfloat16)
            assert torch.equal(tensors[f"{p}.gate_up_proj"][e], gu.T)
            assert torch.equal(tensors[f"{p}.down_proj"][e], dn.T)
        assert torch.equal(tensors[f"{p}.gate_up_proj_bias"], m.gate_up_bias)
        assert torch.equal(tensors[f"{p}.down_proj_bias"], m.down_bias)
    assert not [k for k in tensors if "_projs." in k]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, info = transformers.GptOssForCausalLM.from_pretrained(plain, output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]


@pytest.mark.parametrize("name", ["q", "keep"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_dequantize_never_builds_a_fused_experts_tensor_whole(gpt_oss, name, dtype, tmp_path, monkeypatch):
    """dequantize writes gate_up_proj [E, H, 2I] / down_proj [E, I, H] (fused back from the per-expert
    records, or the kept 16-bit fused tensors cast) and the biases stacked from per-expert ones expert by
    expert: no tensor torch allocates while it makes and writes one is as large as it, the largest is
    one expert's block."""
    size = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    largest = largest_fresh_tensors_of_dequantize(gpt_oss(name), tmp_path / "plain", monkeypatch, dtype=dtype)
    for i in range(LAYERS):
        m = f"model.layers.{i}.mlp.experts"
        fused = {"gate_up_proj": E * H * 2 * INTER, "down_proj": E * INTER * H}
        if name == "q":  # stacked from the per-expert biases (kept: 2-D tensors, written whole)
            fused |= {"gate_up_proj_bias": E * 2 * INTER, "down_proj_bias": E * H}
        for leaf, numel in fused.items():
            key = f"{m}.{leaf}"
            assert largest[key][0] < numel * size, (key, largest[key])
            assert largest[key][0] <= numel // E * size, (key, largest[key])


@pytest.mark.parametrize("name", ["q", "keep"])
def test_dequantize_streamed_bytes_equal_the_whole_tensor_build(gpt_oss, name, tmp_path, monkeypatch):
    """The fused tensors and stacked biases written expert by expert: the same file, byte for byte, as
    each built whole and written at once (bf16, float16 with its overflow check, float32)."""
    for dtype in ("bfloat16", "float16", "float32"):
        assert_streamed_bytes_equal_whole_build(gpt_oss(name), tmp_path / dtype, monkeypatch, dtype=dtype)


def test_model_dequantize_restores_gpt_oss_experts(gpt_oss, tmp_path):
    """model.dequantize(): transformers' GptOssExperts again with the fused tensors: the logits of the
    dequantized folder loaded by transformers (its default experts implementation), bit for bit; it
    saves a plain checkpoint transformers loads."""
    model = load_quantized(gpt_oss("q"))
    model.dequantize()
    assert not moe_modules(model)
    experts = model.model.layers[0].mlp.experts
    assert type(experts).__name__ == "GptOssExperts"
    assert experts.gate_up_proj.shape == (E, H, 2 * INTER)
    ref = _eager(gpt_oss("plain"))
    assert torch.equal(_logits(model), _logits(ref))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "saved")
    assert torch.equal(_logits(_eager(tmp_path / "saved")), _logits(ref))


def test_rerun_is_a_noop(gpt_oss):
    """A second quantize run into the finished folder finds the identical plan: nothing rewritten."""
    folder = gpt_oss("q")
    before = (folder / "model.safetensors").stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = convert(gpt_oss("src"), folder, moe_experts="quantize", progress=False)
    assert r.noop
    assert (folder / "model.safetensors").stat().st_mtime_ns == before


def test_verify_against_the_source_measures_the_per_expert_records(gpt_oss):
    """verify --against the bf16 source reads the fused experts per expert, as the conversion wrote them
    (it said the folder was not converted from that source)."""
    r = CliRunner().invoke(cli, ["verify", str(gpt_oss("q")), "--against", str(gpt_oss("src"))])
    assert r.exit_code == 0, r.output
    assert f"{LAYERS * (4 + 2 * E)} quantized tensors" in r.output


def test_globs_leaving_every_expert_out_write_the_keep_folder(gpt_oss, tmp_path):
    """--moe-experts quantize with --include globs that select no expert weight: the run says the option
    had no effect and writes the folder keep writes, byte for byte (fused experts, not per-expert
    16-bit records)."""
    messages: list[str] = []
    convert(gpt_oss("src"), tmp_path / "q", moe_experts="quantize", include=["*self_attn*"], progress=False,
            warn=messages.append)  # fmt: skip
    assert any("has no effect" in m for m in messages)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(gpt_oss("src"), tmp_path / "keep", include=["*self_attn*"], progress=False)
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "q" / f).read_bytes() == (tmp_path / "keep" / f).read_bytes(), f


def test_a_layer_skipped_whole_stays_16bit_and_loads(gpt_oss, tmp_path):
    """--skip of one layer's experts: its per-expert records 16-bit with the glob as their reason, the
    other layer's 4-bit; load_quantized stacks the 16-bit ones into GptOssExperts' fused parameters
    (logits of the dequantized folder on transformers, bit for bit); a layer split between 4-bit and
    16-bit experts is refused at load with a clear error, and convert warns."""
    out = tmp_path / "q"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(
            gpt_oss("src"), out, moe_experts="quantize", skip=["*.layers.1.mlp.experts.*"], progress=False
        )
    records = open_folder(out).records()
    assert isinstance(records["model.layers.1.mlp.experts.gate_up_projs.0.weight"], torch.Tensor)
    assert not isinstance(records["model.layers.0.mlp.experts.gate_up_projs.0.weight"], torch.Tensor)
    report = json.loads((out / "quantization_report.json").read_text())
    assert "--skip glob" in json.dumps(report)
    s = inspect_path(out).moe
    assert any("load_quantized" in x for x in s.loaders)
    model = _dequant_paths(load_quantized(out))
    assert list(moe_modules(model)) == ["model.layers.0.mlp.experts"]
    dequantize_checkpoint(out, tmp_path / "plain")
    ref = _eager(tmp_path / "plain", experts_implementation="eager")
    assert torch.equal(_logits(model), _logits(ref))
    messages: list[str] = []
    split = tmp_path / "split"
    skip = ["*.layers.1.mlp.experts.*.3.*"]
    convert(gpt_oss("src"), split, moe_experts="quantize", skip=skip, progress=False, warn=messages.append)
    assert any("keep some experts 16-bit" in m for m in messages)
    assert not inspect_path(split).moe.loaders
    with pytest.raises(Exception, match="mixes 4-bit and 16-bit experts"):
        load_quantized(split)


def test_resume_after_sigkill_gives_the_same_bytes(gpt_oss, tmp_path):
    """A quantize run killed after its first shard resumes through the same per-expert view: the
    finished shards are kept and the folder equals an uninterrupted run's, byte for byte."""
    assert_quantize_resumes_after_sigkill(gpt_oss("src"), tmp_path)


def test_estimate_with_a_dict_device_map_matches_the_offloaded_load(gpt_oss, tmp_path):
    """estimate with a dict device_map failed on the quantized gpt-oss folder ("Cannot copy out of meta
    tensor": the per-expert biases of the meta skeleton were copied to the CPU for accelerate's
    check_device_map); it now gives the offloaded load's bytes per device."""
    from converter.loader.estimate import estimate
    from converter.loader.footprint import memory_by_device

    device_map = {"model.layers.1": "disk", "": "cpu"}
    loaded = load_quantized(gpt_oss("q"), device_map=device_map, offload_folder=tmp_path / "offload")
    assert estimate(gpt_oss("q"), device_map)[1] == memory_by_device(loaded)


@pytest.mark.parametrize(
    "targets",
    [["q_proj", "v_proj", "gate_up_projs", "down_projs"], ["q_proj", "experts.gate_up_projs.0"]],
)
def test_lora_naming_the_per_expert_records_beside_other_layers_is_refused(gpt_oss, targets):
    """target_modules naming the 4-bit experts by their per-expert record names (unsloth's
    ``gate_up_projs`` / ``down_projs``) were refused alone, but beside the attention projections
    check_targets let them through and get_peft_model wrapped the attention only, without a word: no
    expert was trained. A target that names only experts is now refused wherever it stands."""
    import peft

    from converter.loader.lora import check_targets

    model = load_quantized(gpt_oss("q"))
    with pytest.raises(ValueError, match=r"name 4-bit MoE experts .*not supported"):
        check_targets(peft.LoraConfig(r=4, target_modules=targets), model)
    check_targets(peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), model)  # no error
