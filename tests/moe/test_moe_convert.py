"""--moe-experts keep|quantize on tiny Qwen3-MoE, Mixtral, OLMoE and DeepSeek-V3 checkpoints; FP8 sources."""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from click.testing import CliRunner
from moe_helpers import (
    FAMILIES,
    FAMILIES_5_25,
    expert_keys,
    longcat_zero_rows,
    make_fp8_source,
    make_longcat_flash,
    make_moe,
    read_config,
)
from safetensors import safe_open
from tiny_models import load_logged, without_config_digests

from converter.cli import cli
from converter.errors import AlreadyQuantizedError, InputError
from converter.kernels import bnb4bit as kernels
from converter.loader.model import load_quantized
from converter.plan.moe import EXPERT_KEY, is_skipped_by_vllm, router_modules
from converter.plan.selection_facts import should_convert_module
from converter.tools.inspection import inspect_path, verify_path
from converter.writer.pipeline import convert
from formats.reader import open_folder


@pytest.fixture(scope="module")
def moe_src(tmp_path_factory: pytest.TempPathFactory):
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = make_moe(name, tmp_path_factory.mktemp(f"moe-{name}"))
        return made[name]

    return get


def _assert_bnb_bytes(rec, w: torch.Tensor, key: str) -> None:
    """4-bit codes and float32 absmax are bitsandbytes' quantize_4bit of the same 2-D weight; the absmax is
    nested by the project's one nesting rule (bnb's CPU nesting uses an approximate 8-bit lookup that
    design.md lists as a known deviation, tested in tests/kernels)."""
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    assert torch.equal(rec.packed.view(torch.uint8).reshape(-1), packed.view(torch.uint8).reshape(-1)), key
    codes, nested_absmax, offset = kernels.quantize_nested(state.absmax)
    assert torch.equal(rec.absmax, codes), key
    assert torch.equal(rec.nested.nested_absmax, nested_absmax), key
    assert rec.nested.offset == offset, key


def _records(folder: Path) -> dict:
    return open_folder(folder).records()


def _source_tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("name", FAMILIES)
def test_quantize_writes_every_expert_as_bnb_record(moe_src, tmp_path, name):
    """Every expert projection is one bnb record whose bytes are bitsandbytes' quantize_4bit of the
    same 2-D weight (nested absmax included); routers stay 16-bit and are named in the skip list."""
    src = moe_src(name)
    out = tmp_path / "q"
    convert(src, out, moe_experts="quantize", progress=False)
    records, source = _records(out), _source_tensors(src)
    experts = expert_keys(src)
    assert experts
    assert all(k in records for k in experts)
    for key in experts:
        _assert_bnb_bytes(records[key], source[key], key)
    qc = read_config(out)["quantization_config"]
    assert "gate" in qc["llm_int8_skip_modules"]
    routers = [k for k in source if k.endswith(".gate.weight")]
    assert routers
    assert all(isinstance(records[k], torch.Tensor) for k in routers)
    # DeepSeek-V3 keeps its router in float32 (_keep_in_fp32_modules_strict), as transformers saves it
    router_dtype = torch.float32 if name == "deepseek_v3" else torch.bfloat16
    assert all(records[k].dtype == router_dtype for k in routers)
    if name == "deepseek_v3":
        shared = [k for k in source if ".shared_experts." in k]
        assert shared
        assert all(not isinstance(records[k], torch.Tensor) for k in shared)
        bias = [k for k in source if k.endswith("e_score_correction_bias")]
        assert bias
        assert all(isinstance(records[k], torch.Tensor) for k in bias)


@pytest.mark.parametrize("name", FAMILIES)
def test_keep_default_warns_and_loads_with_stock_transformers(moe_src, tmp_path, name):
    """The default keeps experts 16-bit, warns once naming the share and the flag, and the folder still
    loads with transformers + bitsandbytes with no missing or unexpected key."""
    import transformers

    src = moe_src(name)
    out = tmp_path / "keep"
    messages: list[str] = []
    result = convert(src, out, progress=False, warn=messages.append)
    assert result.notes == messages
    messages = _moe_warnings(messages)  # deepseek_v3's 96-wide rows also get the bnb CPU advice
    assert len(messages) == 1
    assert "--moe-experts quantize" in messages[0]
    assert "% of the parameters" in messages[0]
    records = _records(out)
    assert all(isinstance(records[k], torch.Tensor) for k in expert_keys(src))
    cls = getattr(transformers, read_config(out)["architectures"][0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = cls.from_pretrained(out, device_map="cpu", output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    # train mode: bnb's eval-mode CPU repacking needs out_features % 32 == 0 (DeepSeek's 48-row kv_a_proj)
    model.train()
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def _bnb_modules(model, cls) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, cls)}


@pytest.mark.parametrize("name", FAMILIES_5_25)
def test_families_new_in_transformers_5_25_load_where_inspect_says(moe_src, tmp_path, name):
    """MiniCPM-5-MoE, Kolibri-1.1 and Param2-MoE (transformers 5.25; skipped before): convert refused
    MiniCPM-5-MoE ("transformers rebuilds 'model.layers.1.mlp.experts' (MiniCPM5MoeExperts) as other
    layers", though transformers rebuilds them for AWQ only). Each converts: the nf4 and int8 ``keep``
    folders load with stock transformers + bitsandbytes (no missing, unexpected or mismatched key), with
    Linear4bit / Linear8bitLt exactly at the modules of our quantized records (load_quantized's), and run;
    ``--moe-experts quantize`` names stock transformers 5.x among the loaders that cannot read it, and it
    indeed refuses the folder; transformers 4.x, which has no such model class, is no loader either
    (inspect and the conversion's summary said it was)."""
    from converter.loader.module import QuantLinear4bit
    from converter.loader.module_int8 import QuantLinear8bit

    src = moe_src(name)
    for quant_type, theirs, ours in (
        ("nf4", bnb.nn.Linear4bit, QuantLinear4bit),
        ("int8", bnb.nn.Linear8bitLt, QuantLinear8bit),
    ):
        out = tmp_path / quant_type
        convert(src, out, quant_type=quant_type, progress=False, warn=lambda _: None)
        model, info, _ = load_logged(out)
        assert not any(info.values()), info
        stock = _bnb_modules(model, theirs)
        records = [r for r in _records(out).values() if not isinstance(r, torch.Tensor)]
        assert len(stock) == len(records) > 0
        assert stock == _bnb_modules(load_quantized(out), ours)
        assert not any(".experts." in m for m in stock)
        with torch.no_grad():
            assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()
    out = tmp_path / "quantize"
    result = convert(src, out, moe_experts="quantize", progress=False, warn=lambda _: None)
    summary = inspect_path(out).moe
    assert summary.experts_quantized == 4
    assert any(x.startswith("quantize-model load_quantized") for x in summary.loaders)
    assert any(x.startswith("stock transformers 5.x") for x in summary.not_loaders)
    model_type = read_config(out)["model_type"]
    for moe_summary in (summary, result.moe):
        assert not any("transformers 4.x" in x for x in moe_summary.loaders), moe_summary.loaders
        assert f"transformers 4.x (no {model_type} model class" in "; ".join(moe_summary.not_loaders)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            load_logged(out)


def test_keep_warning_with_int8_advises_a_4bit_type(moe_src, tmp_path):
    """With --quant-type int8 the keep warning advised --moe-experts quantize, which int8 refuses: it
    says experts are quantized only with the 4-bit types, and the advice it gives is accepted."""
    src = moe_src("qwen3_moe")
    messages: list[str] = []
    convert(src, tmp_path / "int8", quant_type="int8", progress=False, warn=messages.append)
    (message,) = [m for m in _moe_warnings(messages) if "% of the parameters" in m]
    assert "stay 16-bit" in message
    assert "only with the 4-bit types" in message
    assert "--quant-type nf4 --moe-experts quantize" in message
    with pytest.raises(InputError, match="nf4 / fp4, not int8"):
        convert(src, tmp_path / "q", quant_type="int8", moe_experts="quantize", progress=False)
    convert(src, tmp_path / "nf4", quant_type="nf4", moe_experts="quantize", progress=False, warn=print)


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_keep_warning_on_gpt_oss_fused_experts_names_the_per_expert_records(moe_src, tmp_path, quant_type):
    """gpt-oss stores its experts fused 3-D on disk with biases. The keep warning said no mode quantizes
    them; --moe-experts quantize now writes them as unsloth's per-expert records (loader/moe_gpt_oss.py),
    so the warning says so and names who loads that folder (with int8: the 4-bit types it needs); the
    quantize run quantizes them (no 'has no effect' note)."""
    src = moe_src("gpt_oss")
    messages: list[str] = []
    convert(src, tmp_path / "keep", quant_type=quant_type, progress=False, warn=messages.append)
    (message,) = [m for m in _moe_warnings(messages) if "% of the parameters" in m]
    assert "stay 16-bit" in message
    assert "fused" in message
    assert "unsloth's names" in message
    assert "not with stock transformers 5.x nor vLLM" in message
    assert ("--quant-type nf4 --moe-experts quantize" in message) == (quant_type == "int8")
    if quant_type == "int8":
        return
    messages.clear()
    convert(src, tmp_path / "q", progress=False, moe_experts="quantize", warn=messages.append)
    assert not any("has no effect" in m for m in messages)


@pytest.mark.parametrize("source", ["bf16", "fp8"])
def test_inspect_of_an_unconverted_moe_folder_names_no_loader(moe_src, tmp_path, source):
    """inspect of a MoE source folder (nothing quantized: bf16, or a block-FP8 DeepSeek-V3 checkpoint)
    listed "quantize-model load_quantized" and "stock transformers + bitsandbytes (experts stay 16-bit)"
    among the loaders of a folder that load_quantized refuses as no bitsandbytes checkpoint."""
    src = moe_src("deepseek_v3")
    if source == "fp8":
        src = make_fp8_source(src, tmp_path / "fp8")
    summary = inspect_path(src).moe
    assert summary is not None
    assert summary.loaders == ()
    assert any("load_quantized" in x and "convert" in x for x in summary.not_loaders)
    assert "16 bit" not in summary.layout  # FP8 experts are not 16-bit
    with pytest.raises(InputError, match="no quantized weight"):
        load_quantized(src)


def test_keep_output_is_unchanged_by_the_option(moe_src, tmp_path):
    """moe_experts='keep' writes the same bytes as a conversion that never heard of the option."""
    src = moe_src("qwen3_moe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(src, tmp_path / "a", progress=False)
        convert(src, tmp_path / "b", progress=False, moe_experts="keep")
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert (
        "moe_experts" not in json.loads((tmp_path / "a" / "quantization_report.json").read_text())["options"]
    )


def test_quantize_honours_skip_globs(moe_src, tmp_path):
    src = moe_src("mixtral")
    convert(src, tmp_path / "q", moe_experts="quantize", skip=["*.experts.3.*"], progress=False)
    records = _records(tmp_path / "q")
    for key in expert_keys(src):
        assert isinstance(records[key], torch.Tensor) == (".experts.3." in key), key


@pytest.mark.parametrize(
    ("skip", "loads"),
    [("*.experts.3.*", False), ("*.experts.0.*", False), ("*.layers.0.*.experts.*", True)],
    ids=["one-expert", "expert-0", "one-layer"],
)
def test_skip_that_splits_a_layers_experts_is_said_not_to_load(moe_src, tmp_path, skip, loads):
    """A --skip that keeps one expert of a layer 16-bit made a folder that load_quantized refuses (it stacks a
    layer's experts into one 4-bit or one 16-bit module), while inspect listed load_quantized as its loader
    and convert said nothing; skipping whole layers' experts loads. With expert 0 the one kept 16-bit, the
    refusal was an AttributeError ('Tensor' object has no attribute 'blocksize')."""
    from converter.loader.model import load_quantized
    from converter.loader.moe_records import MoeLoadError

    messages: list[str] = []
    out = tmp_path / "q"
    src = moe_src("mixtral")
    convert(src, out, moe_experts="quantize", skip=[skip], progress=False, warn=messages.append)
    summary = inspect_path(out).moe
    assert summary.experts_kept
    assert summary.experts_quantized
    says_loads = any("load_quantized" in x for x in summary.loaders)
    assert says_loads == loads
    assert any("load_quantized" in x for x in summary.not_loaders) != loads
    assert any("whole layers' experts" in m for m in messages) != loads
    from converter.tools.push import build_model_card

    card = build_model_card(out, "me/tiny-moe-nf4")
    assert "every routed MoE expert in 4 bit" not in card
    assert re.search(r"with \d+ routed MoE experts in 4 bit and \d+ kept 16-bit", card)
    if loads:
        load_quantized(out, device="cpu", dtype=torch.bfloat16)
    else:
        with pytest.raises(MoeLoadError, match="split the layer's experts"):
            load_quantized(out, device="cpu", dtype=torch.bfloat16)


def test_experts_not_filling_whole_blocks_are_said_not_to_load(moe_src, tmp_path):
    """32x64 experts with --blocksize 4096: load_quantized refuses them (a layer's codes are kept back to
    back per expert), while convert's warning said "load_quantized runs them" and inspect listed it."""
    from converter.loader.model import load_quantized
    from converter.loader.moe_records import MoeLoadError

    messages: list[str] = []
    out = tmp_path / "q"
    convert(moe_src("qwen3_moe_i32"), out, moe_experts="quantize", blocksize=4096, progress=False,
            warn=messages.append)  # fmt: skip
    (advice,) = [m for m in messages if "not MoE experts whose weights do not fill whole blocks" in m]
    # bitsandbytes on CUDA decodes them (blocks over the flattened weight): the warning must not lump it
    # in with our loader's refusal; and the widths (32, 64) are multiples of 16, so bitsandbytes' CPU
    # dequantize decodes them right for another reason: each weight is a single (partial) block
    assert "bitsandbytes on CUDA decodes them right" in advice
    assert "cannot load this folder, and so does" not in advice
    assert "none is a multiple of 16" not in advice
    assert "each is a single block" in advice
    summary = inspect_path(out).moe
    assert not any("load_quantized" in x for x in summary.loaders)
    assert any("load_quantized" in x and "whole blocks" in x for x in summary.not_loaders)
    with pytest.raises(MoeLoadError, match="whole 4096-element blocks"):
        load_quantized(out, device="cpu", dtype=torch.bfloat16)
    messages.clear()
    convert(moe_src("qwen3_moe_i32"), tmp_path / "q64", moe_experts="quantize", progress=False,
            warn=messages.append)  # fmt: skip  # rows of 32 < 64 but every expert fills whole blocks
    assert not any("not MoE experts" in m for m in messages), messages
    assert any("load_quantized" in x for x in inspect_path(tmp_path / "q64").moe.loaders)


def _damaged(src: Path, dst: Path, change) -> Path:
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    tensors = _source_tensors(dst)
    change(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


_DAMAGE = {
    "one-projection-missing": (
        lambda t: t.pop("model.layers.1.mlp.experts.2.up_proj.weight"),
        "model.layers.1.mlp.experts.2.up_proj.weight is missing",
    ),
    "last-expert-missing": (
        lambda t: [
            t.pop(f"model.layers.1.mlp.experts.3.{p}.weight") for p in ("gate_proj", "up_proj", "down_proj")
        ],
        "num_local_experts = 4 but the checkpoint holds only experts 0..2",
    ),
    "expert-of-another-shape": (
        lambda t: t.__setitem__("model.layers.1.mlp.experts.3.gate_proj.weight", torch.zeros(32, 64)),
        "experts.3.gate_proj.weight has shape [32, 64] but model.layers.1.mlp.experts.0.gate_proj.weight",
    ),
}


@pytest.mark.parametrize("mode", ["keep", "quantize"])
@pytest.mark.parametrize("damage", list(_DAMAGE))
def test_incomplete_or_mismatched_experts_are_refused(moe_src, tmp_path, damage, mode):
    """A source with an expert or a projection missing, or one expert of another shape, converted to a
    folder that looked complete (verify OK, inspect listing its loaders) and that no loader can stack."""
    change, expected = _DAMAGE[damage]
    src = _damaged(moe_src("qwen3_moe"), tmp_path / "src", change)
    with pytest.raises(InputError, match=re.escape(expected)):
        convert(src, tmp_path / "o", moe_experts=mode, progress=False, warn=lambda _: None)
    assert not (tmp_path / "o" / "config.json").exists()
    r = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "o2"), "--moe-experts", mode, "-q"])
    assert r.exit_code == 2, r.output


def _moe_warnings(messages: list[str]) -> list[str]:
    return [m for m in messages if "element blocks" not in m]


def test_dense_model_gets_no_warning(tmp_path, tiny_checkpoint):
    messages: list[str] = []
    convert(tiny_checkpoint("llama"), tmp_path / "o", progress=False, warn=messages.append)
    assert _moe_warnings(messages) == []


def test_quantize_on_a_dense_model_is_not_recorded(tmp_path, tiny_checkpoint):
    """--moe-experts quantize on a model without experts changes nothing: it said so nowhere, and the
    folder recorded "moe_experts": "quantize" (shard metadata, index, report) as if experts had been
    quantized, with other bytes than the same conversion without the flag."""
    src = tiny_checkpoint("llama")
    convert(src, tmp_path / "plain", progress=False, warn=lambda _: None)
    messages: list[str] = []
    convert(src, tmp_path / "q", progress=False, moe_experts="quantize", warn=messages.append)
    (note,) = _moe_warnings(messages)
    assert "no routed MoE experts" in note
    assert "has no effect" in note
    for name in ("model.safetensors", "model.safetensors.index.json"):
        assert (tmp_path / "q" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name
    report = json.loads((tmp_path / "q" / "quantization_report.json").read_text())
    assert "moe_experts" not in report["options"]


def test_router_leaf_that_ends_a_quantized_module_is_listed_by_full_name(moe_src, tmp_path):
    """MiniMax's attention has an nn.Linear self_attn.output_gate, quantized; --moe-experts quantize listed
    its routers' leaf 'gate' in llm_int8_skip_modules, which transformers 5 also matches as a suffix, so
    it built output_gate as a 16-bit Linear over the packed codes and `verify` failed the fresh folder
    ('llm_int8_skip_modules keeps ... output_gate ... unquantized'). The routers are listed by their
    whole module names there: transformers and vLLM skip them, and nothing else."""
    from transformers.quantizers.quantizers_utils import should_convert_module as hf_should_convert

    src = moe_src("minimax")
    convert(src, tmp_path / "q", moe_experts="quantize", progress=False)
    skip = read_config(tmp_path / "q")["quantization_config"]["llm_int8_skip_modules"]
    routers = [f"model.layers.{i}.block_sparse_moe.gate" for i in range(2)]
    assert skip == ["lm_head", *routers]
    records = _records(tmp_path / "q")
    gates = [k.removesuffix(".weight") for k in records if k.endswith("self_attn.output_gate.weight")]
    assert gates
    assert all(not isinstance(records[f"{m}.weight"], torch.Tensor) for m in gates)  # quantized
    assert all(hf_should_convert(m, skip) for m in gates)  # transformers builds their Linear4bit
    assert not any(hf_should_convert(m, skip) for m in routers)
    assert all(is_skipped_by_vllm(m, skip) for m in routers)
    assert not any(is_skipped_by_vllm(m, skip) for m in gates)
    result = verify_path(tmp_path / "q")
    assert result.ok, result.problems


def test_ernie_vl_text_and_vision_experts_convert_with_keep(moe_src, tmp_path):
    """ERNIE-4.5-VL holds a layer's text experts then its vision experts, of other widths (config.json's
    moe_intermediate_size [64, 32]), under one experts module; transformers splits them into text_moe /
    vision_moe. Every conversion was refused as 'a damaged source' ('... must all have the same shapes');
    keep converts and loads with stock transformers + bitsandbytes, the experts as the source's; quantize,
    which no loader of 4-bit experts reads here, is refused naming the groups and keep."""
    import transformers

    src = moe_src("ernie4_5_vl_moe")
    convert(src, tmp_path / "keep", progress=False, warn=lambda _: None)
    assert verify_path(tmp_path / "keep").ok
    with pytest.raises(InputError) as err:
        convert(src, tmp_path / "q", moe_experts="quantize", progress=False, warn=lambda _: None)
    assert str(err.value) == (
        "model.layers.1.mlp.experts: --moe-experts quantize does not take ERNIE-4.5-VL's experts (one "
        "experts module of text and vision experts, 0..3 of width 64, 4..7 of width 32, which transformers "
        "splits into text_moe and vision_moe; no loader of 4-bit experts reads them): convert with "
        "--moe-experts keep (the default), which stock transformers + bitsandbytes loads"
    )
    damaged = tmp_path / "damaged"  # a vision expert of the text experts' width: still a damaged source
    shutil.copytree(src, damaged)
    tensors = _source_tensors(src)
    experts = "model.layers.1.mlp.experts"
    tensors[f"{experts}.5.up_proj.weight"] = tensors[f"{experts}.0.up_proj.weight"].clone()
    from safetensors.torch import save_file

    save_file(tensors, damaged / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"experts\.5\.up_proj\.weight has shape \[64, 64\] but .*\.4\."):
        convert(damaged, tmp_path / "d", progress=False, warn=lambda _: None)
    cls = transformers.Ernie4_5_VLMoeForConditionalGeneration
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = cls.from_pretrained(src, dtype=torch.bfloat16)
        ours, info = cls.from_pretrained(tmp_path / "keep", device_map="cpu", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    layer, want = ours.model.language_model.layers[1].mlp, ref.model.language_model.layers[1].mlp
    for group in ("text_moe", "vision_moe"):
        for p in ("gate_up_proj", "down_proj"):
            got, exp = getattr(getattr(layer, group).experts, p), getattr(getattr(want, group).experts, p)
            assert torch.equal(got, exp), (group, p)


def test_ernie_vl_keep_folder_loads_with_load_quantized(moe_src, tmp_path):
    """load_quantized of an ERNIE-4.5-VL keep folder: the layer's experts split into text_moe / vision_moe
    and its routers moved as transformers' conversion moves them (mlp.gate.weight [H, E] transposed into
    text_moe.gate, gate.weight_1 into vision_moe.gate, moe_statics' [2, E] bias a row to each); it raised
    'no fused experts module'. Every 16-bit tensor equals transformers + bitsandbytes' load of the folder,
    nothing is unused or newly initialized, and on the dequantize path the logits equal those of the
    dequantized folder loaded by transformers, bit for bit."""
    import transformers

    from converter.loader.dequantize import dequantize_checkpoint
    from converter.loader.model import linear4bit_modules

    convert(moe_src("ernie4_5_vl_moe"), tmp_path / "keep", progress=False, warn=lambda _: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = load_quantized(tmp_path / "keep")
    assert not [
        str(w.message) for w in caught if "unused" in str(w.message) or "initialized" in str(w.message)
    ]
    cls = transformers.Ernie4_5_VLMoeForConditionalGeneration
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bnb_model = cls.from_pretrained(tmp_path / "keep", device_map="cpu", dtype=torch.bfloat16)
    theirs, mine = bnb_model.state_dict(), ours.state_dict()
    assert set(theirs) <= set(mine)
    plain = [k for k, v in theirs.items() if v.dtype in (torch.bfloat16, torch.float32)]
    assert "model.language_model.layers.1.mlp.vision_moe.gate.weight" in plain
    assert [k for k in plain if not torch.equal(theirs[k], mine[k])] == []
    dequantize_checkpoint(tmp_path / "keep", tmp_path / "plain")
    for layer in linear4bit_modules(ours).values():
        layer.use_gemv = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = cls.from_pretrained(tmp_path / "plain", dtype=torch.bfloat16, experts_implementation="eager")
    ids = torch.tensor([[1, 5, 9, 20, 33, 60, 7]])
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, ref.eval()(input_ids=ids).logits)


@pytest.mark.parametrize(
    ("name", "first", "more"),
    [
        ("granitemoe", "model.layers.0.block_sparse_moe.input_linear.weight", 3),
        ("ergo", "layers.1.feed_forward.down_proj", 1),  # no .weight: Ergo's own names
    ],
)
def test_experts_of_a_layout_not_quantized_are_named(moe_src, tmp_path, name, first, more):
    """Granite-MoE stores its routed experts fused 3-D under its own names (block_sparse_moe.input_linear
    / output_linear), and Ergo (transformers 5.25) as feed_forward.up_proj / down_proj, which no
    --moe-experts mode quantizes: quantize's note said 'the checkpoint has no routed MoE experts' and keep
    said nothing while those experts, 16-bit, held most of the folder."""
    src = moe_src(name)
    for mode in ("keep", "quantize"):
        messages: list[str] = []
        convert(src, tmp_path / mode, progress=False, moe_experts=mode, warn=messages.append)
        (message,) = _moe_warnings(messages)
        assert "no routed MoE experts" not in message
        layout = f"routed experts ({first} and {more} more) are stored in a layout quantize-model does not"
        assert f"{layout} quantize" in message
    assert "has no effect" in message  # quantize: the folder is keep's, byte for byte
    for file in ("model.safetensors", "model.safetensors.index.json"):
        assert (tmp_path / "quantize" / file).read_bytes() == (tmp_path / "keep" / file).read_bytes(), file


@pytest.mark.parametrize(
    ("name", "first", "experts", "tensors"),
    [
        # 2 layers x 4 experts, an input_linear and an output_linear per layer
        ("granitemoe", "model.layers.0.block_sparse_moe.input_linear.weight", 8, 4),
        # the MLP's 4 experts and the attention's 4 per layer; its attention router
        # (self_attention.experts.router.layer) is no expert
        ("jetmoe", "model.layers.0.mlp.input_linear.weight", 16, 8),
        # Ergo: 8 experts in its one sparse layer, an up_proj and a down_proj
        ("ergo", "layers.1.feed_forward.down_proj", 8, 2),
    ],
)
def test_inspect_names_experts_of_a_layout_not_quantized(moe_src, tmp_path, name, first, experts, tensors):
    """inspect (text and --json) and convert's summary say what convert's warning says of Granite's /
    JetMoE's fused experts: kept 16-bit, in a layout quantize-model does not quantize, counted as experts;
    inspect said nothing of them ("moe": null) while they held most of the folder."""
    src = moe_src(name)
    runner = CliRunner()
    r = runner.invoke(cli, ["convert", str(src), str(tmp_path / "q"), "--moe-experts", "quantize", "--json"])
    assert r.exit_code == 0, r.output
    layout = (
        f"experts kept in 16 bit (stored in a layout quantize-model does not quantize: {first} and "
        f"{tensors - 1} more)"
    )
    warning = f"routed experts ({first} and {tensors - 1} more) are stored in a layout quantize-model"
    assert warning in r.stderr
    assert json.loads(r.stdout)["moe"]["layout"] == layout  # convert's summary row too
    r = runner.invoke(cli, ["inspect", str(tmp_path / "q"), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)["moe"]
    assert summary["layout"] == layout
    assert summary["unquantized_layout"] == f"{first} and {tensors - 1} more"
    assert (summary["experts_quantized"], summary["experts_kept"]) == (0, experts)
    assert (summary["expert_tensors_quantized"], summary["expert_tensors_kept"]) == (0, tensors)
    assert summary["loaders"] == [
        "stock transformers + bitsandbytes (experts stay 16-bit)",
        "quantize-model load_quantized",
    ]
    r = runner.invoke(cli, ["inspect", str(tmp_path / "q")], terminal_width=400)
    assert r.exit_code == 0, r.output
    row = f"{layout}: 0 experts quantized, {experts} kept (0 expert weights quantized, {tensors} kept)"
    assert row in r.stdout
    source = inspect_path(src).moe  # a source checkpoint: nothing quantized, said as for other experts
    assert source.layout == "experts not quantized (no weight is: a source checkpoint)"
    assert (source.experts_kept, source.tensors_kept) == (experts, tensors)


def test_include_naming_experts_of_a_layout_not_quantized(moe_src, tmp_path):
    """--include naming Granite's 3-D experts only: 'nothing to quantize' gave the head as its example
    ('lm_head.weight': lm_head (output embedding)), a tensor the glob did not name, and said to check
    --include; it names the experts the glob matched, why they stay 16-bit."""
    src = moe_src("granitemoe")
    with pytest.raises(InputError) as err:
        convert(src, tmp_path / "o", include=["*input_linear*"], progress=False, warn=lambda _: None)
    msg = str(err.value)
    assert "nothing to quantize" in msg
    assert (
        "(e.g. 'model.layers.0.block_sparse_moe.input_linear.weight': not nn.Linear (GraniteMoeExperts))"
        in msg
    )
    assert "routed MoE experts stored in this layout stay 16-bit" in msg
    assert "lm_head" not in msg


def test_experts_that_are_linears_are_not_named_as_kept():
    """Experts built as nn.Linear modules under other names (NLLB-MoE's experts.expert_0.fc1) are quantized
    as any linear: the notes do not call them 16-bit experts of a layout quantize-model does not quantize."""
    from converter.plan.moe import keep_advice, no_effect_note
    from converter.sources.base import TensorInfo

    names = [
        f"model.encoder.layers.0.ffn.experts.expert_{e}.{p}.weight" for e in range(4) for p in ("fc1", "fc2")
    ]
    tensors = [TensorInfo(n, "f", "BF16", (64, 64)) for n in names]
    tensors.append(TensorInfo("model.shared.weight", "f", "BF16", (128, 64)))
    note = no_effect_note(tensors, "quantize", names)
    assert note is not None
    assert "the checkpoint has no routed MoE experts" in note
    assert keep_advice(tensors, "keep", quantized=names) is None
    kept = no_effect_note(tensors, "quantize", [])  # the same tensors left 16-bit are named
    assert kept is not None
    assert f"routed experts ({names[0]} and 7 more) are stored" in kept


def test_config_with_infinity_as_transformers_writes_it(moe_src, tmp_path):
    """transformers' save_pretrained writes the floats JSON cannot hold tagged ({"__float__": "Infinity"}:
    GraniteMoeHybrid's time_step_limit [0, inf]) and its from_pretrained reads them back; convert passed
    the tag to the config class and refused every such checkpoint (exit 2, 'config.json: transformers
    cannot read it (StrictDataclassFieldValidationError: ... time_step_limit ...)')."""
    import transformers

    src = moe_src("granitemoehybrid")
    written = json.loads((src / "config.json").read_text())
    assert written["time_step_limit"] == [0.0, {"__float__": "Infinity"}]
    r = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "o"), "-q"])
    assert r.exit_code == 0, r.output
    assert "routed experts (model.layers.0.block_sparse_moe.input_linear.weight and 3 more)" in r.stderr
    out = json.loads((tmp_path / "o" / "config.json").read_text())
    assert out["time_step_limit"] == written["time_step_limit"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert model.config.time_step_limit == (0.0, float("inf"))
    assert type(model.model.layers[0].mamba.in_proj).__name__ == "Linear4bit"


def test_bad_mode_is_refused(moe_src, tmp_path):
    with pytest.raises(InputError, match=r"--moe-experts 'all'.*keep or quantize"):
        convert(moe_src("olmoe"), tmp_path / "o", moe_experts="all", progress=False)


def test_cli_flag_and_warning(moe_src, tmp_path):
    src = moe_src("olmoe")
    runner = CliRunner()
    r = runner.invoke(cli, ["convert", str(src), str(tmp_path / "keep")])
    assert r.exit_code == 0, r.output
    assert r.stderr.count("--moe-experts quantize") == 1
    r = runner.invoke(cli, ["convert", str(src), str(tmp_path / "q"), "--moe-experts", "quantize"])
    assert r.exit_code == 0, r.output
    assert "--moe-experts" not in r.stderr
    records = _records(tmp_path / "q")
    assert all(not isinstance(records[k], torch.Tensor) for k in expert_keys(src))
    r = runner.invoke(cli, ["inspect", str(tmp_path / "q"), "--json"])
    assert r.exit_code == 0, r.output
    moe = json.loads(r.stdout)["moe"]
    cfg = read_config(src)
    experts = cfg["num_hidden_layers"] * cfg["num_experts"]
    assert len(expert_keys(src)) == 3 * experts
    assert moe["experts_quantized"] == experts  # (layer, expert) pairs: gate, up and down are one expert
    assert moe["experts_kept"] == 0
    assert moe["expert_tensors_quantized"] == len(expert_keys(src))  # the records
    assert any("vLLM" in x for x in moe["loaders"])
    assert any("stock transformers 5" in x for x in moe["not_loaders"])
    r = runner.invoke(cli, ["verify", str(tmp_path / "q")])  # the metadata schema knows the option
    assert r.exit_code == 0, r.output
    keep = inspect_path(tmp_path / "keep").moe
    assert keep is not None
    assert keep.experts_quantized == 0
    assert any("vLLM" in x for x in keep.not_loaders)
    # transformers 4.x makes the 16-bit experts and routers Linear4bit and fails to load the folder
    assert any(x.startswith("transformers 4.x") for x in keep.not_loaders)
    assert not any("4.x" in x for x in keep.loaders)
    assert keep.loaders[0].startswith("stock transformers 5.x")
    assert inspect_path(tmp_path / "q").moe.layout == "experts quantized (per-expert bnb nf4 records)"


def test_experts_are_counted_as_experts_not_tensors(moe_src, tmp_path):
    """inspect (text and --json), the conversion report and the model card count experts as (layer,
    expert) pairs: they counted tensors, so 2 layers of 4 experts read "24 quantized" (gate, up and down
    records of each); the tensor counts keep their own names. An expert with one projection skipped is
    "partly" quantized, neither quantized nor kept."""
    from converter.plan import moe as moe_plan
    from converter.tools.push import build_model_card

    src = moe_src("olmoe")
    cfg = read_config(src)
    layers, per_layer = cfg["num_hidden_layers"], cfg["num_experts"]
    experts = layers * per_layer
    runner = CliRunner()
    r = runner.invoke(cli, ["convert", str(src), str(tmp_path / "q"), "--moe-experts", "quantize", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)["moe"]
    assert (report["experts_quantized"], report["experts_kept"]) == (experts, 0)
    assert report["expert_tensors_quantized"] == 3 * experts
    r = runner.invoke(cli, ["inspect", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    assert f"{experts} experts quantized, 0 kept ({3 * experts} expert weights quantized, 0 kept)" in r.stdout

    # down_proj kept 16-bit in every expert: all of them partly quantized
    out = tmp_path / "down16"
    convert(
        src, out, moe_experts="quantize", skip=["*.experts.*.down_proj"], progress=False, warn=lambda m: None
    )
    summary = inspect_path(out).moe
    assert summary.layout == "experts partly quantized"
    assert (summary.experts_quantized, summary.experts_kept, summary.experts_partly) == (0, 0, experts)
    assert (summary.tensors_quantized, summary.tensors_kept) == (2 * experts, experts)
    assert summary.to_json()["experts_partly_quantized"] == experts
    card = build_model_card(out, "me/tiny-moe-nf4")
    assert f"with 0 routed MoE experts in 4 bit, {experts} partly and 0 kept 16-bit" in card

    # layer 0's experts kept whole: the card counts experts, not weights
    out = tmp_path / "layer0"
    convert(src, out, moe_experts="quantize", skip=["*.layers.0.mlp.experts.*"], progress=False)
    want = (experts - per_layer, per_layer, 0)
    summary = inspect_path(out).moe
    assert (summary.experts_quantized, summary.experts_kept, summary.experts_partly) == want
    card = build_model_card(out, "me/tiny-moe-nf4")
    assert f"with {experts - per_layer} routed MoE experts in 4 bit and {per_layer} kept 16-bit" in card

    # fused 3-D tensors hold shape[0] experts each (a source's, kept; a converted folder's, quantized)
    fused = [f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")]
    shapes = {n: (8, 64, 32) for n in fused}
    kept = moe_plan.summarize([], fused, shapes=shapes)
    assert (kept.experts_kept, kept.tensors_kept) == (16, 4)
    quantized = moe_plan.summarize([*fused, "model.layers.0.self_attn.q_proj.weight"], [], shapes=shapes)
    assert (quantized.experts_quantized, quantized.tensors_quantized) == (16, 4)
    with pytest.raises(ValueError, match="needs its shape"):
        moe_plan.summarize(fused, [])


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_verify_names_routers_missing_from_the_skip_list(moe_src, tmp_path, name):
    """A --moe-experts quantize folder whose llm_int8_skip_modules lost the router leaf ("gate") would
    have vLLM's bnb loader take the 16-bit routers for quantized layers: verify names them (it used to
    pass). Full module names (vLLM's prefix match) skip them as well as the leaf does."""
    out = tmp_path / "q"
    convert(moe_src(name), out, moe_experts="quantize", progress=False)
    assert verify_path(out).ok
    without_config_digests(out)  # the edits below would be named by config.json's digest too
    config = read_config(out)
    routers = sorted(k.removesuffix(".weight") for k in _records(out) if k.endswith(".gate.weight"))
    assert len(routers) == 2  # one per layer of the tiny models
    skip = config["quantization_config"]["llm_int8_skip_modules"]
    config["quantization_config"]["llm_int8_skip_modules"] = [m for m in skip if m != "gate"]
    (out / "config.json").write_text(json.dumps(config))
    r = CliRunner().invoke(cli, ["verify", str(out), "-q"])
    assert r.exit_code == 1, r.output
    [problem] = verify_path(out).problems
    assert f"does not list the 16-bit router(s) {routers[0]}, {routers[1]} " in problem
    assert problem.endswith("add 'gate' to the list")
    config["quantization_config"]["llm_int8_skip_modules"] += routers
    (out / "config.json").write_text(json.dumps(config))
    assert verify_path(out).ok


def test_router_linear_inside_a_gate_stays_16_bit_and_is_skipped(moe_src, tmp_path):
    """HunYuan-MoE's router is an nn.Linear inside its gate module (``mlp.gate.wg``): --moe-experts
    quantize quantized it and left it out of llm_int8_skip_modules, although routers stay 16-bit (vLLM
    and unsloth expect them so). It is kept as it is on disk and listed by its leaf, and the list
    matches no quantized module (transformers' suffix match, vLLM's component match)."""
    src = moe_src("hunyuan_v1_moe")
    out = tmp_path / "q"
    convert(src, out, moe_experts="quantize", progress=False)
    records, source = _records(out), _source_tensors(src)
    assert all(k in records and not isinstance(records[k], torch.Tensor) for k in expert_keys(src))
    routers = [k for k in source if k.endswith(".mlp.gate.wg.weight")]
    assert len(routers) == 2  # one per layer
    assert all(isinstance(records[k], torch.Tensor) and torch.equal(records[k], source[k]) for k in routers)
    skip = read_config(out)["quantization_config"]["llm_int8_skip_modules"]
    assert "wg" in skip
    quantized = [k.removesuffix(".weight") for k, r in records.items() if not isinstance(r, torch.Tensor)]
    assert any(".self_attn." in m for m in quantized)
    assert any(".shared_mlp." in m for m in quantized)
    assert all(should_convert_module(m, skip) and not is_skipped_by_vllm(m, skip) for m in quantized)
    assert verify_path(out).ok


def test_router_names():
    """Routers by checkpoint name (the skip list's leaves): the router modules themselves and the
    linear inside HunYuan-MoE's gate and LongCat-Flash's router; nothing else."""
    routers = {
        "model.layers.0.mlp.gate.weight": "gate",
        "model.layers.0.mlp.shared_expert_gate.weight": "shared_expert_gate",
        "model.layers.0.block_sparse_moe.router.weight": "router",
        "model.layers.0.mlp.gate.wg.weight": "wg",
        "model.layers.0.mlp.router.classifier.weight": "classifier",
    }
    others = [
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.experts.0.gate_proj.weight",
        "model.layers.0.mlp.shared_mlp.gate_proj.weight",
        "model.layers.0.mlp.gate.wg.bias",
        "model.layers.0.linear_attn.forget_gate.f_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "classifier.weight",
        "score.weight",
    ]
    got = router_modules([*routers, *others], ())
    assert got == {k.removesuffix(".weight"): leaf for k, leaf in routers.items()}


# ---------------------------------------------------------------------------------------------
# FP8 sources


def test_fp8_block_source_is_dequantized_then_quantized(moe_src, tmp_path):
    """DeepSeek-style FP8 (float8_e4m3fn + weight_scale_inv): each weight is dequantized exactly as
    transformers' Fp8Dequantize does (float32 product, one bf16 cast), then quantized as usual."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    from converter.sources.fp8 import dequantize_block_fp8

    src = make_fp8_source(moe_src("deepseek_v3"), tmp_path / "fp8", block=(32, 32))
    out = tmp_path / "q"
    convert(src, out, moe_experts="quantize", progress=False)
    fp8 = _source_tensors(src)
    records = _records(out)
    assert not any(k.endswith("weight_scale_inv") for k in records)
    assert "quantization_config" in read_config(out)
    assert read_config(out)["quantization_config"]["quant_method"] == "bitsandbytes"
    dequant = Fp8Dequantize(None)
    checked = divisible = 0
    for key, w in fp8.items():
        if w.dtype != torch.float8_e4m3fn:
            continue
        scale = fp8[key.removesuffix(".weight") + ".weight_scale_inv"]
        if w.shape[0] % 32 or w.shape[1] % 32:
            # transformers refuses partial blocks (DeepSeek's 80-row kv_a_proj_with_mqa here); DeepSeek's
            # ceil grid applies, checked element by element in test_fp8_partial_edge_blocks
            ref = dequantize_block_fp8(w, scale, (32, 32))
        else:
            ref = dequant._dequantize_one(w, scale, torch.bfloat16)
            divisible += 1
        _assert_bnb_bytes(records[key], ref, key)
        checked += 1
    assert checked >= 3 * 16 + 3  # every routed expert projection, the shared expert, attention
    assert divisible >= 3 * 16
    again = convert(src, out, moe_experts="quantize", progress=False)  # the same FP8 source: nothing to do
    assert again.noop
    from converter.loader.model import load_quantized

    with torch.no_grad():
        assert torch.isfinite(load_quantized(out)(torch.tensor([[1, 2, 3]])).logits).all()


def test_fp8_source_size_is_its_bytes_on_disk(moe_src, tmp_path):
    """An FP8 source's "Bytes in" (convert's summary, the report, the pushed card's "(from X)") and the
    dry run's "Size in" counted each FP8 weight at its bf16 size and its scales not at all (a 339 kB source
    reported as 609 kB): they are the source's tensor bytes as its safetensors header stores them."""
    from converter.tools.push import build_model_card
    from converter.units import human_bytes
    from converter.writer.report import REPORT_NAME

    src = make_fp8_source(moe_src("deepseek_v3"), tmp_path / "fp8", block=(128, 128))
    with (src / "model.safetensors").open("rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    stored = {k: e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items()}
    on_disk = sum(stored.values())
    as_bf16 = sum(
        2 * math.prod(header[k]["shape"]) if header[k]["dtype"] == "F8_E4M3" else n
        for k, n in stored.items()
        if not k.endswith("weight_scale_inv")
    )
    assert as_bf16 > on_disk  # the old count differs from the right one on this source
    out = tmp_path / "q"
    pre = convert(src, out, moe_experts="quantize", progress=False, dry_run=True).preflight
    assert pre.bytes_in == on_disk
    result = convert(src, out, moe_experts="quantize", progress=False)
    assert result.bytes_in == result.bytes_read == on_disk
    assert json.loads((out / REPORT_NAME).read_text())["summary"]["bytes_in"] == on_disk
    assert f"(from {human_bytes(on_disk)})" in build_model_card(out, "someone/tiny-fp8-bnb")


@pytest.mark.parametrize("mode", ["keep", "quantize"])
def test_verify_against_an_fp8_source_measures_the_dequantized_weights(moe_src, tmp_path, mode):
    """`verify --against` an FP8 source compared the folder with the raw float8 codes (relative RMSE ~1.0
    for every weight, "reconvert the folder", exit 1) instead of the bf16 weights convert quantized."""
    src = make_fp8_source(moe_src("deepseek_v3"), tmp_path / "fp8", block=(128, 128))
    out = tmp_path / "q"
    convert(src, out, moe_experts=mode, progress=False, warn=lambda _: None)
    r = CliRunner().invoke(cli, ["verify", str(out), "--against", str(src), "--json"])
    assert r.exit_code == 0, r.output
    quality = json.loads(r.stdout)["quality"]
    assert 0 < quality["rel_rmse"] < 0.2
    assert quality["tensors_measured"] >= 16


def test_fp8_partial_edge_blocks(tmp_path):
    """Shapes not a multiple of the block: edge blocks take their own scale (DeepSeek's ceil grid)."""
    from converter.sources.fp8 import dequantize_block_fp8

    w = torch.randn(40, 70).to(torch.float8_e4m3fn)
    s = torch.rand(2, 3) + 0.5
    got = dequantize_block_fp8(w, s, (32, 32))
    ref = torch.empty(40, 70)
    for i in range(40):
        for j in range(70):
            ref[i, j] = w[i, j].float() * s[i // 32, j // 32]
    assert torch.equal(got, ref.to(torch.bfloat16))


def test_other_quantized_sources_are_still_refused(moe_src, tmp_path):
    src = make_fp8_source(moe_src("qwen3_moe"), tmp_path / "fp8")
    cfg = read_config(src)
    del cfg["quantization_config"]["weight_block_size"]  # per-tensor FP8: not ours to dequantize
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AlreadyQuantizedError, match="already quantized"):
        convert(src, tmp_path / "o", progress=False)
    missing = tmp_path / "noscale"
    shutil.copytree(make_fp8_source(moe_src("qwen3_moe"), tmp_path / "fp8b"), missing)
    tensors = _source_tensors(missing)
    dropped = next(k for k in tensors if k.endswith("weight_scale_inv"))
    del tensors[dropped]
    from safetensors.torch import save_file

    save_file(tensors, missing / "model.safetensors")
    with pytest.raises(AlreadyQuantizedError, match=dropped.removesuffix("_scale_inv")):
        convert(missing, tmp_path / "o2", progress=False)
    assert EXPERT_KEY.match("model.layers.0.mlp.experts.7.w3.weight")


def test_fp8_nonfinite_block_scale_is_a_damaged_file_even_when_skipped(moe_src, tmp_path):
    """A NaN block scale makes its block NaN: the error names the scale tensor, its file and the block,
    and does not advise --skip, which would write the NaNs (it used to, and did)."""
    from safetensors.torch import save_file

    from converter.errors import CorruptFileError

    src = make_fp8_source(moe_src("deepseek_v3"), tmp_path / "fp8")
    tensors = _source_tensors(src)
    scale = next(k for k in tensors if k.endswith("down_proj.weight_scale_inv"))
    tensors[scale][0, 1] = float("nan")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    blocks = tensors[scale].numel()
    expected = re.escape(
        f"'{scale}' in model.safetensors: 1 of {blocks} FP8 block scales are NaN or Inf "
        "(the first at block (0, 1))"
    )
    for skip in ((), [scale.removesuffix(".weight_scale_inv")]):
        with pytest.raises(CorruptFileError, match=expected) as info:
            convert(src, tmp_path / f"o{len(skip)}", skip=skip, progress=False)
        assert "--skip" not in str(info.value)
        assert not (tmp_path / f"o{len(skip)}" / "model.safetensors").exists()


def test_model_card_names_the_loaders(moe_src, tmp_path):
    from converter.tools.push import build_model_card

    src = moe_src("qwen3_moe")
    convert(src, tmp_path / "q", moe_experts="quantize", progress=False)
    card = build_model_card(tmp_path / "q", "me/tiny-moe-nf4")
    assert "Which loaders read this folder" in card
    assert "vLLM" in card
    assert "stock transformers 5.x" in card
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(src, tmp_path / "keep", progress=False)
    card = build_model_card(tmp_path / "keep", "me/tiny-moe-keep")
    assert "experts kept in 16 bit" in card
    assert "AutoModelForCausalLM.from_pretrained" in card


def test_transformers_4x_is_named_a_loader_only_of_its_own_model_types(moe_src, tmp_path):
    """4-bit per-expert records load with transformers 4.x + bitsandbytes where 4.x has the model class
    (Qwen3-MoE); for a model type that came in 5.x (config.json's model_type renamed here) inspect and
    the model card name 4.x among the loaders that cannot read it, saying why, and the keep warning
    leaves it out of the readers it names."""
    from converter.plan.moe import HeaderTensor, keep_advice
    from converter.tools.push import build_model_card

    src = moe_src("qwen3_moe")
    with open_folder(src) as ckpt:
        tensors = [HeaderTensor(k, ckpt.entry(k).dtype, tuple(ckpt.entry(k).shape)) for k in ckpt.passthrough]
    readers = "quantize-model's load_quantized, vLLM (pre-quantized bnb, TP=1)"
    assert f"{readers}, transformers 4.x and unsloth," in keep_advice(tensors, "keep", model_type="qwen3_moe")
    assert f"{readers} and unsloth," in keep_advice(tensors, "keep", model_type="minicpm5_moe")
    out = tmp_path / "q"
    convert(src, out, moe_experts="quantize", progress=False)
    assert "transformers 4.x + bitsandbytes" in inspect_path(out).moe.loaders
    config = read_config(out)
    config["model_type"] = "minicpm5_moe"
    (out / "config.json").write_text(json.dumps(config))
    summary = inspect_path(out).moe
    assert not any("4.x" in x for x in summary.loaders)
    assert "vLLM pre-quantized bitsandbytes (NF4, uint8 storage, tensor parallel 1)" in summary.loaders
    why = "transformers 4.x (no minicpm5_moe model class: the model type came in transformers 5.x)"
    assert summary.not_loaders.count(why) == 1
    card = build_model_card(out, "me/tiny-moe-nf4")
    loaders, _, not_loaders = card.partition("Not:")
    assert "4.x" not in loaders.split("Which loaders read this folder")[1]
    assert why in not_loaders


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_quantize_same_bytes_without_transformers(moe_src, tmp_path, monkeypatch, name):
    """The per-family allowlist (no transformers installed) gives the same quantize-mode folder."""
    import converter.plan.selection as selection

    src = moe_src(name)
    convert(src, tmp_path / "hf", moe_experts="quantize", progress=False)
    monkeypatch.setattr(selection, "transformers_usable", lambda: False)
    convert(src, tmp_path / "allowlist", moe_experts="quantize", progress=False)
    a, b = _records(tmp_path / "hf"), _records(tmp_path / "allowlist")
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert torch.equal(a[k].packed, b[k].packed), k
    qa = read_config(tmp_path / "hf")["quantization_config"]["llm_int8_skip_modules"]
    qb = read_config(tmp_path / "allowlist")["quantization_config"]["llm_int8_skip_modules"]
    assert "gate" in qa
    assert "gate" in qb


@pytest.mark.parametrize(
    ("options", "why"),
    [({"quant_type": "fp4"}, "fp4"), ({"quant_storage": "float16"}, "float16"), ({}, None)],
    ids=["fp4", "float16-storage", "nf4-uint8"],
)
def test_inspect_and_card_list_vllm_only_for_nf4_uint8_experts(moe_src, tmp_path, options, why):
    """vLLM's pre-quantized bitsandbytes MoE loader decodes every expert as NF4 and allows only uint8
    quant_storage (reference/moe-4bit.md): inspect and the model card listed it as a loader of FP4 or
    float16-storage expert folders too, which it would decode wrongly or refuse."""
    from converter.tools.push import build_model_card

    convert(moe_src("qwen3_moe"), tmp_path / "q", moe_experts="quantize", progress=False, **options)
    summary = inspect_path(tmp_path / "q").moe
    card = build_model_card(tmp_path / "q", "me/tiny-moe")
    loaders = card.split("## Which loaders read this folder")[1].split("Not:")[0]
    if why is None:
        assert any("vLLM" in x for x in summary.loaders)
        assert "vLLM" in loaders
    else:
        assert not any("vLLM" in x for x in summary.loaders)
        assert any("vLLM" in x and why in x for x in summary.not_loaders)
        assert "vLLM" not in loaders
        assert any("quantize-model load_quantized" in x for x in summary.loaders)


@pytest.mark.parametrize(
    ("quant_type", "dtype"), [("nf4", "float16"), ("nf4", "float32"), ("int8", "float16")]
)
def test_fp8_source_cast_to_another_dtype_rounds_once(moe_src, tmp_path, quant_type, dtype):
    """--dtype float16/float32 of an FP8 source casts each weight's float32 product once, as transformers'
    Fp8Dequantize casts it to the parameter's dtype: the weights were rounded to bf16 first, then cast
    again (a --dtype float32 folder held bf16-precision weights; 62% of float16 values were others). The
    folder is the one converted from a source holding the float32 products, byte for byte."""
    from safetensors.torch import save_file
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    from converter.sources.fp8 import dequantize_block_fp8

    src = make_fp8_source(moe_src("qwen3_moe"), tmp_path / "fp8", block=(32, 32))
    fp8 = _source_tensors(src)
    exact = tmp_path / "f32"  # the same weights as their float32 products, in a plain checkpoint
    shutil.copytree(src, exact)
    scales = {k.removesuffix("_scale_inv"): w for k, w in fp8.items() if k.endswith("_scale_inv")}
    products = {
        k: dequantize_block_fp8(w, scales[k], (32, 32), torch.float32) if k in scales else w
        for k, w in fp8.items()
        if not k.endswith("_scale_inv")
    }
    save_file(products, exact / "model.safetensors", metadata={"format": "pt"})
    cfg = read_config(exact)
    del cfg["quantization_config"]
    (exact / "config.json").write_text(json.dumps(cfg))
    kw = dict(quant_type=quant_type, dtype=dtype, skip=["*.q_proj"], progress=False, warn=lambda _: None)
    convert(src, tmp_path / "a", **kw)
    convert(exact, tmp_path / "b", **kw)
    got, want = _source_tensors(tmp_path / "a"), _source_tensors(tmp_path / "b")
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k
    kept = "model.layers.0.self_attn.q_proj.weight"  # an FP8 weight kept unquantized: transformers' values
    scale = fp8[kept.removesuffix(".weight") + ".weight_scale_inv"]
    ref = Fp8Dequantize(None)._dequantize_one(fp8[kept], scale, getattr(torch, dtype))
    assert got[kept].dtype == ref.dtype
    assert torch.equal(got[kept], ref)


@pytest.mark.parametrize("name", ["granitemoe", "granitemoehybrid", "jetmoe", "ergo"])
def test_push_card_names_experts_of_a_layout_not_quantized_as_inspect_does(moe_src, tmp_path, name):
    """The model card of a Granite-MoE / Granite 4.0-H / JetMoE folder had no "MoE experts" row (it read
    the index's key names only), while inspect and convert named those experts as kept 16-bit: the row
    now says what inspect says, from the shard headers (a folder without an index too)."""
    from converter.tools.push import build_model_card

    out = tmp_path / "q"
    convert(moe_src(name), out, progress=False, warn=lambda _: None)
    layout = inspect_path(out).moe.layout
    assert layout.startswith("experts kept in 16 bit (stored in a layout quantize-model does not quantize: ")
    row = f"| MoE experts | {layout} |"
    card = build_model_card(out, f"me/tiny-{name}-nf4")
    assert row in card.splitlines()
    assert "## Load with transformers (needs `bitsandbytes`)" in card  # stock transformers loads it
    (out / "model.safetensors.index.json").unlink()  # one shard, no index: read from its header
    assert row in build_model_card(out, f"me/tiny-{name}-nf4").splitlines()


def test_longcat_flash_zero_experts_as_transformers_5_24_saves_them(tmp_path):
    """transformers 5.24's save_pretrained writes LongCat-Flash's zero (identity) experts' unused gate/up
    rows but no down weight: convert refused every such checkpoint as 'config.json has n_routed_experts = 4
    but the checkpoint holds expert 5 ... (an incomplete or damaged source ...)'. keep writes them as they
    are, which stock transformers 5.24 + bitsandbytes loads (its experts and router equal the source's),
    and so does load_quantized (tests/moe/test_moe_loader.py), which inspect and the card list (with its
    snippet); quantize is refused, saying what they are and to use keep. transformers 5.25 keeps no rows
    for those experts: it refuses the source and the folder alike (a size mismatch), load_quantized
    leaves them out (test_moe_loader.py)."""
    import transformers

    from converter.plan.moe import LOADERS_ZERO_EXPERTS
    from converter.tools.push import build_model_card

    src = make_longcat_flash(tmp_path / "src", zero_rows=True)
    first = "model.layers.0.mlp.experts"
    with pytest.raises(InputError) as err:
        convert(src, tmp_path / "q", moe_experts="quantize", progress=False, warn=lambda _: None)
    assert str(err.value) == (
        f"{first}: experts 4..5 have gate_proj and up_proj weights but no down_proj: they are "
        "config.json's zero_expert_num = 2 zero-computation (identity) experts after its n_routed_experts "
        "= 4, whose unused gate/up rows transformers' save_pretrained writes (LongCat-Flash's gate_up_proj "
        "holds 6 experts, its down_proj 4, up to transformers 5.24); --moe-experts quantize does not take "
        "them (no 4-bit expert loader reads an expert without its down weight): convert with --moe-experts "
        "keep (the default), which load_quantized loads, and stock transformers 5.24 or older + bitsandbytes"
    )
    out = tmp_path / "keep"
    convert(src, out, progress=False, warn=lambda _: None)
    records, source = _records(out), _source_tensors(src)
    experts = [k for k in source if k.startswith(f"{first}.")]
    assert len(experts) == 4 * 3 + 2 * 2
    assert all(torch.equal(records[k], source[k]) for k in experts)
    summary = inspect_path(out).moe
    assert summary.loaders == LOADERS_ZERO_EXPERTS
    assert "quantize-model load_quantized" in summary.loaders
    assert not any("load_quantized" in x for x in summary.not_loaders)
    card = build_model_card(out, "me/tiny-longcat-nf4")
    assert 'load_quantized("me/tiny-longcat-nf4")' in card
    assert (
        "LongcatFlashForCausalLM.from_pretrained(" in card or "AutoModelForCausalLM.from_pretrained(" in card
    )
    cls = transformers.LongcatFlashForCausalLM
    if not longcat_zero_rows():  # transformers 5.25 or later: no place for the zero experts' rows
        for folder in (src, out):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
                    cls.from_pretrained(folder, device_map="cpu", dtype=torch.bfloat16)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = cls.from_pretrained(src, dtype=torch.bfloat16).state_dict()
        theirs = cls.from_pretrained(out, device_map="cpu", dtype=torch.bfloat16).state_dict()
    for key in (f"{first}.gate_up_proj", f"{first}.down_proj", "model.layers.0.mlp.router.classifier.weight"):
        assert torch.equal(theirs[key], ref[key]), key
