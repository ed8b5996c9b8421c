"""The shipped selection table and the per-user cache decide exactly as live transformers does.

The table (converter/plan/selection_table.json) is generated from tiny configs; here every tabled
architecture is decided again from configs the generator never built (other layer and expert counts,
both tie_word_embeddings values, a --skip glob) and compared with the live rule on the skeleton.
"""

from __future__ import annotations

import json

import pytest
import transformers
from packaging.version import Version
from tiny_models import read_config, read_infos

from converter.plan import selection_table
from converter.plan.selection import build_skeleton, select_tensors
from converter.plan.selection_facts import (
    MATCHERS,
    decide,
    facts_from_model,
    matcher_of,
    should_convert_module,
    should_convert_module_prefix,
)
from converter.plan.selection_table_gen import ARCHITECTURES
from converter.sources.base import TensorInfo

TABLE = selection_table.load_table()
CURRENT = transformers.__version__ in TABLE.get("transformers", [])
needs_current = pytest.mark.skipif(
    not CURRENT,
    reason=f"selection_table.json is for transformers {', '.join(TABLE.get('transformers', []))}, "
    f"{transformers.__version__} is installed: run python -m converter.plan.selection_table_gen (it adds "
    "the version where the content is the same)",
)

#: count fields raised so the configs differ from the generator's (layers, experts, dense layers)
_BUMP = {
    "num_hidden_layers": 3,
    "n_layer": 2,
    "num_layers": 1,
    "num_decoder_layers": 2,
    "num_experts": 2,
    "num_local_experts": 3,
    "n_routed_experts": 2,
    "first_k_dense_replace": 1,
}


def _config(cls_name: str, **overrides) -> dict:
    model_type, kwargs = ARCHITECTURES[cls_name]
    kwargs = dict(kwargs)
    for k, d in _BUMP.items():
        if k in kwargs:
            kwargs[k] += d
    kwargs.update(overrides)
    config = transformers.AutoConfig.for_model(model_type, **kwargs).to_dict()
    config["architectures"] = [cls_name]
    return config


def _checkpoint(config: dict) -> list[TensorInfo]:
    """The tensors save_pretrained would write for this config (names and shapes, no data)."""
    from transformers.core_model_loading import revert_weight_conversion

    model = build_skeleton(config)
    sd = revert_weight_conversion(model, model.state_dict())
    tied = set(getattr(model, "all_tied_weights_keys", None) or ())  # save_pretrained leaves them out
    return [
        TensorInfo(k, "model.safetensors", "BF16", tuple(v.shape)) for k, v in sd.items() if k not in tied
    ]


def test_table_is_current():
    """The table is used for every transformers version it lists, never for another one (every lookup
    misses, the live rule decides)."""
    assert TABLE, "converter/plan/selection_table.json is missing"
    versions = TABLE["transformers"]
    assert versions
    assert versions == sorted(set(versions), key=Version)  # sorted, each once
    config = _config("LlamaForCausalLM")
    keys = [t.name for t in _checkpoint(config)]
    for version in versions:
        assert selection_table.table_facts(config, keys, version) is not None, version
    assert selection_table.table_facts(config, keys, "0.0.0") is None
    assert selection_table.table_facts(config, keys, None) is None  # transformers not installed


def test_a_version_the_table_does_not_list_takes_the_live_rule(tiny_checkpoint, tmp_path, monkeypatch):
    """Simulated versions: a table valid for two versions decides for both; a third (one between them
    too) misses, so the live rule decides (and fills the per-user cache for that version)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = tiny_checkpoint("llama_tied")
    config, infos = read_config(folder), read_infos(folder)
    keys = [t.name for t in infos]
    two = {**TABLE, "transformers": ["5.24.0", "5.26.0"]}
    monkeypatch.setattr(selection_table, "load_table", lambda: two)
    for version in ("5.24.0", "5.26.0"):
        monkeypatch.setattr(selection_table, "transformers_version", lambda v=version: v)
        assert selection_table.table_facts(config, keys, version) is not None
        assert select_tensors(config, infos).via == "table", version
    assert selection_table.table_info()["transformers"] == ["5.24.0", "5.26.0"]
    assert selection_table.table_info()["used"] is True
    for version in ("5.25.0", "5.24", "5.24.0.dev0", "5.27.0"):
        monkeypatch.setattr(selection_table, "transformers_version", lambda v=version: v)
        assert selection_table.table_facts(config, keys, version) is None, version
        assert selection_table.lookup(config, keys) is None, version
        assert selection_table.table_info()["used"] is False
    assert select_tensors(config, infos).via == "live"
    assert select_tensors(config, infos).via == "cache"  # 5.27.0's entry
    # a table in the previous format (one version, a string) is not read at all
    monkeypatch.undo()
    old = {**TABLE, "format": 1, "transformers": TABLE["transformers"][0]}
    path = tmp_path / "plan"
    path.mkdir()
    (path / selection_table.TABLE_NAME).write_text(json.dumps(old), encoding="utf-8")
    monkeypatch.setattr(selection_table.resources, "files", lambda _: path)
    selection_table.load_table.cache_clear()
    try:
        assert selection_table.load_table() == {}
        assert selection_table.table_info()["transformers"] == []
        assert selection_table.table_facts(config, keys, TABLE["transformers"][0]) is None
    finally:
        monkeypatch.undo()
        selection_table.load_table.cache_clear()
    assert selection_table.load_table() == TABLE


@needs_current
@pytest.mark.parametrize("cls_name", sorted(TABLE.get("archs", {})))
def test_table_decides_as_live_transformers(cls_name):
    entry = TABLE["archs"][cls_name]
    for values in map(json.loads, entry["variants"]):
        config = _config(cls_name, **dict(zip(entry["variant_fields"], values, strict=True)))
        tensors = _checkpoint(config)
        keys = [t.name for t in tensors]
        table = selection_table.table_facts(config, keys, transformers.__version__)
        assert table is not None, (cls_name, values)
        live = facts_from_model(build_skeleton(config), keys)
        for skip, include in (((), ()), (("*.1.*",), ()), ((), ("*layers.0.*", "*h.0.*", "*block.0.*"))):
            want = decide(live, tensors, skip=skip, include=include)
            got = decide(table, tensors, skip=skip, include=include)
            assert got == want, (cls_name, values, skip, include)
        assert any(live.keys[k].reason is None for k in keys), cls_name  # something is quantizable


@needs_current
def test_real_smollm2_config_uses_the_table():
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_hidden_layers": 30,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "pad_token_id": 2,
        "dtype": "bfloat16",
    }
    tensors = _checkpoint(config)
    assert len(tensors) == 272  # 30 layers x 9 + embedding + final norm (the head is tied)
    got = select_tensors(config, tensors)
    assert got.via == "table"
    live = decide(
        facts_from_model(build_skeleton(config), [t.name for t in tensors]), tensors, skip=(), include=()
    )
    assert {k for k, _ in got.quantize.items()} == set(live.quantize)
    assert len(got.quantize) == 210
    # transformers' default skips of the untied model from_pretrained builds: the head is its last
    # parameter, so the final norm is not "the last module"
    assert got.skip_modules == live.skip_modules == ["embed_tokens", "lm_head"]


@needs_current
def test_table_misses_never_guess():
    config = _config("DeepseekV3ForCausalLM")
    tensors = _checkpoint(config)
    keys = [t.name for t in tensors]
    version = transformers.__version__
    assert selection_table.table_facts(config, keys, version) is not None
    n = config["num_hidden_layers"]
    # DeepSeek-V3's multi-token-prediction layer sits past num_hidden_layers: transformers drops it
    mtp = [k.replace("layers.1.", f"layers.{n}.") for k in keys if k.startswith("model.layers.1.")]
    assert selection_table.table_facts(config, keys + mtp, version) is None
    # a missing projection (llm_int8_skip_modules would not know it), an unknown key
    missing = [k for k in keys if k != "model.layers.0.self_attn.o_proj.weight"]
    assert selection_table.table_facts(config, missing, version) is None
    assert selection_table.table_facts(config, [*keys, "model.layers.0.extra.weight"], version) is None
    # a config field spelled by its alias, an architecture not in the table
    gpt2 = _config("GPT2LMHeadModel")
    gpt2_keys = [t.name for t in _checkpoint(gpt2)]
    assert selection_table.table_facts(gpt2, gpt2_keys, version) is not None
    assert selection_table.table_facts({**gpt2, "num_hidden_layers": 4}, gpt2_keys, version) is None
    other = {**config, "architectures": ["DeepseekV3ForSequenceClassification"]}
    assert selection_table.table_facts(other, keys, version) is None


def test_tiny_checkpoints_use_the_table_and_agree_with_live(tiny_checkpoint, monkeypatch):
    folder = tiny_checkpoint("llama_tied")
    config, infos = read_config(folder), read_infos(folder)
    if not CURRENT:
        select_tensors(config, infos)  # another transformers: the live rule fills the user cache
    fast = select_tensors(config, infos, skip=["*down_proj"])
    monkeypatch.setattr(selection_table, "lookup", lambda *a: None)
    live = select_tensors(config, infos, skip=["*down_proj"])
    assert live.via == "live"
    assert fast.via == ("table" if CURRENT else "cache")
    assert (fast.quantize, fast.keep, fast.skip_modules, fast.keep_fp32) == (
        live.quantize,
        live.keep,
        live.skip_modules,
        live.keep_fp32,
    )


def test_user_cache_remembers_the_live_rule(tiny_checkpoint, tmp_path, monkeypatch):
    """An architecture outside the table: live once, then from ~/.cache (keyed by transformers version)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = tiny_checkpoint("t5")
    config, infos = read_config(folder), read_infos(folder)
    config["architectures"] = ["T5Model"]  # not in the table
    first = select_tensors(config, infos)
    assert first.via == "live"
    files = list((tmp_path / "quantize-model" / "selection").glob("*.json"))
    assert len(files) == 1
    second = select_tensors(config, infos)
    assert second.via == "cache"
    assert (second.quantize, second.keep, second.skip_modules, second.keep_fp32) == (
        first.quantize,
        first.keep,
        first.skip_modules,
        first.keep_fp32,
    )
    # the cache keeps the model's shapes: a tensor of another shape is kept as the live rule keeps it
    q = "encoder.block.0.layer.0.SelfAttention.q.weight"
    odd = [TensorInfo(t.name, t.file, t.dtype, (7, 9)) if t.name == q else t for t in infos]
    got = select_tensors(config, odd)
    assert got.via == "cache"
    assert got.keep[q] == "shape [7, 9] differs from T5Model's [64, 64]"
    # another transformers version, a damaged entry, the cache turned off: the live rule
    monkeypatch.setattr(selection_table, "transformers_version", lambda: "0.0.1")
    assert select_tensors(config, infos).via == "live"
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for f in files:
        f.write_text("{not json")
    assert select_tensors(config, infos).via == "live"
    assert select_tensors(config, infos).via == "cache"
    monkeypatch.setenv(selection_table.NO_CACHE_ENV, "1")
    assert select_tensors(config, infos).via == "live"


def test_should_convert_module_is_transformers_own():
    from transformers.quantizers.quantizers_utils import should_convert_module as hf

    names = [
        "lm_head",
        "model.layers.1.mlp.down_proj",
        "model.layers.11.mlp.down_proj",
        "layers.1.mlp.gate",
        "layers.1.mlp.gate_proj",
        "transformer.h.0.attn.c_attn",
        "encoder.block.0.layer.1.DenseReluDense.wo",
    ]
    patterns = [
        None,
        [],
        ["lm_head"],
        ["layers.1"],
        ["layers.1.mlp.gate"],
        ["layers.*"],
        ["wo"],
        ["mlp.down_proj", "c_attn"],
        ["model.layers.1.mlp"],
    ]
    # the installed transformers' behaviour is one we mirror (5.2x: boundary, 5.17: prefix) ...
    ours = MATCHERS[matcher_of(hf)]
    for p in patterns:
        for n in names:
            assert ours(n, p) == hf(n, p), (n, p)
    # transformers 5.17's prefix matcher: "layers.1" also caught "layers.11"
    assert not should_convert_module_prefix("model.layers.11.mlp", ["model.layers.1"])
    assert should_convert_module("model.layers.11.mlp", ["model.layers.1"])


@needs_current
@pytest.mark.parametrize("cast", [None, "float16", "bfloat16"])
def test_keep_in_fp32_strict_is_apart_from_keep_in_fp32(cast):
    """DeepSeek-V3 keeps its router in float32 by _keep_in_fp32_modules_strict (for float16 and
    bfloat16 models), T5 its "wo" by _keep_in_fp32_modules (float16 only): the table, the live rule
    and the plan tell them apart."""
    from converter.plan.tensor_plan import Options, build_plan

    config = _config("DeepseekV3ForCausalLM")
    tensors = _checkpoint(config)
    live = select_tensors(config, tensors, use_transformers=True)
    table = selection_table.table_facts(config, [t.name for t in tensors], transformers.__version__)
    assert table is not None
    gates = {t.name for t in tensors if t.name.endswith("mlp.gate.weight")}
    assert gates
    assert gates <= live.keep_fp32_strict
    assert not live.keep_fp32
    assert decide(table, tensors, skip=(), include=()).keep_fp32_strict == live.keep_fp32_strict
    plan = build_plan(tensors, live, Options(dtype=cast), config=config, source_identity={})
    dtypes = {p.info.name: p.out_dtype for p in plan.tensors}
    assert {dtypes[g] for g in gates} == {"F32"}  # the checkpoint is bf16: fp32 whatever the cast
