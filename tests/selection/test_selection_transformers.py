"""Selection with transformers: the weights we pick are exactly where transformers + bitsandbytes
build Linear4bit, both by default and when given our llm_int8_skip_modules."""

from __future__ import annotations

import pytest
import transformers
from tiny_models import TINY, linear4bit_modules, quantized_modules, read_config, read_infos

from converter.plan.selection import select_tensors

ARCHS = ["llama", "llama_odd", "llama_tied", "gpt2", "bert", "t5", "mixtral", "qwen3_moe"]


def _load_4bit(folder, skip_modules, cls_name=None):
    cfg = read_config(folder)
    cls = getattr(transformers, cls_name or cfg["architectures"][0])
    qc = transformers.BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=skip_modules)
    return cls.from_pretrained(folder, quantization_config=qc, device_map="cpu")


@pytest.mark.parametrize("name", ARCHS)
def test_selected_equals_transformers_linear4bit(tiny_checkpoint, name):
    folder = tiny_checkpoint(name)
    sel = select_tensors(read_config(folder), read_infos(folder))
    assert sel.mode == "transformers"
    want = quantized_modules(sel)
    assert want, "nothing selected"
    # with our list (which replaces transformers' default list) ...
    assert linear4bit_modules(_load_4bit(folder, sel.skip_modules)) == want
    # ... and with transformers' own default list: we mirror it when no --skip is given
    assert linear4bit_modules(_load_4bit(folder, None)) == want
    # every tensor is decided exactly once
    names = {t.name for t in read_infos(folder)}
    assert set(sel.quantize) | set(sel.keep) == names
    assert not set(sel.quantize) & set(sel.keep)


def test_llama_rules(tiny_checkpoint):
    folder = tiny_checkpoint("llama")
    sel = select_tensors(read_config(folder), read_infos(folder))
    assert len(sel.quantize) == 14  # 7 projections x 2 layers
    assert not any(s.transpose for s in sel.quantize.values())
    assert sel.keep["lm_head.weight"] == "lm_head (output embedding)"
    assert sel.keep["model.embed_tokens.weight"] == "not nn.Linear (Embedding)"
    assert sel.skip_modules == ["lm_head"]
    assert sel.keep_fp32 == set()


def test_tied_llama_has_no_head_tensor_and_skips_it(tiny_checkpoint):
    folder = tiny_checkpoint("llama_tied")
    infos = read_infos(folder)
    assert "lm_head.weight" not in {t.name for t in infos}
    sel = select_tensors(read_config(folder), infos)
    assert "lm_head" in sel.skip_modules
    assert "embed_tokens" in sel.skip_modules  # tied to lm_head: transformers' default list has it


def test_gpt2_conv1d_is_transposed(tiny_checkpoint):
    folder = tiny_checkpoint("gpt2")
    sel = select_tensors(read_config(folder), read_infos(folder))
    assert len(sel.quantize) == 8
    assert all(s.transpose for s in sel.quantize.values())
    assert sel.keep["transformer.wte.weight"] == "not nn.Linear (Embedding)"
    assert sel.keep["transformer.h.0.attn.c_attn.bias"] == "bias"


def test_bert_pooler_is_quantized_like_transformers(tiny_checkpoint):
    # transformers' "last module" rule takes the last *parameter* name, pooler.dense.bias, and strips
    # only ".weight": so the pooler is not protected and transformers quantizes it. We follow.
    folder = tiny_checkpoint("bert")
    sel = select_tensors(read_config(folder), read_infos(folder))
    assert "pooler.dense.weight" in sel.quantize
    assert len(sel.quantize) == 13
    assert sel.skip_modules == []


def test_t5_keeps_wo_in_fp32(tiny_checkpoint):
    folder = tiny_checkpoint("t5")
    sel = select_tensors(read_config(folder), read_infos(folder))
    wo = {t.name for t in read_infos(folder) if t.name.endswith("DenseReluDense.wo.weight")}
    assert len(wo) == 4
    for k in wo:
        assert sel.keep[k] == "_keep_in_fp32_modules"
    assert sel.keep_fp32 == wo
    assert len(sel.quantize) == 28  # q,k,v,o (+ cross q,k,v,o in the decoder) and wi
    assert "lm_head" in sel.skip_modules  # tied to shared


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_moe_experts_and_router_stay_unquantized(tiny_checkpoint, name):
    folder = tiny_checkpoint(name)
    infos = read_infos(folder)
    sel = select_tensors(read_config(folder), infos)
    experts = [t.name for t in infos if ".experts." in t.name]
    assert len(experts) == 2 * 4 * 3
    for k in experts:
        assert sel.keep[k] == "fused MoE experts (merged on load)"
    routers = [t.name for t in infos if t.name.endswith(".gate.weight")]
    assert len(routers) == 2
    for k in routers:
        assert sel.keep[k] == "router"
    assert quantized_modules(sel) == {
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    }


def test_skip_glob_and_base_model_load(tiny_checkpoint):
    """A user --skip puts inner modules in the list; it is written without the base-model prefix,
    so both LlamaForCausalLM and the bare LlamaModel (AutoModel) build Linear4bit exactly where we
    quantized."""
    folder = tiny_checkpoint("llama")
    sel = select_tensors(read_config(folder), read_infos(folder), skip=["*.mlp.down_proj"])
    assert sel.keep["model.layers.0.mlp.down_proj.weight"] == "--skip glob '*.mlp.down_proj'"
    assert "layers.0.mlp.down_proj" in sel.skip_modules
    want = quantized_modules(sel)
    assert len(want) == 12
    assert linear4bit_modules(_load_4bit(folder, sel.skip_modules)) == want
    base = _load_4bit(folder, sel.skip_modules, "LlamaModel")
    assert linear4bit_modules(base) == {n.removeprefix("model.") for n in want}


def test_include_restricts(tiny_checkpoint):
    folder = tiny_checkpoint("llama")
    sel = select_tensors(read_config(folder), read_infos(folder), include=["*self_attn*"])
    assert quantized_modules(sel) == {
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    }
    assert sel.keep["model.layers.1.mlp.up_proj.weight"] == "not matched by --include"
    assert linear4bit_modules(_load_4bit(folder, sel.skip_modules)) == quantized_modules(sel)


def test_subclassed_linears_stay_16_bit_as_in_transformers_and_convert_says_why(tiny_checkpoint, tmp_path):
    """Falcon's linears are FalconLinear (a subclass of nn.Linear): transformers + bitsandbytes build no
    Linear4bit for them, so neither do we, and convert's "nothing to quantize" names one of them and
    why instead of the head (which every model keeps) and a hint about --include/--skip."""
    from converter.errors import InputError
    from converter.writer.pipeline import convert

    folder = tiny_checkpoint("falcon")
    sel = select_tensors(read_config(folder), read_infos(folder))
    assert not sel.quantize
    assert linear4bit_modules(_load_4bit(folder, sel.skip_modules)) == set()
    assert sel.keep["transformer.h.0.mlp.dense_h_to_4h.weight"] == (
        "a subclass of nn.Linear, which transformers + bitsandbytes do not quantize (FalconLinear)"
    )
    with pytest.raises(InputError) as err:
        convert(folder, tmp_path / "out", progress=False)
    assert str(err.value) == (
        "nothing to quantize: no tensor is a float32/float16/bfloat16 linear weight selected for "
        "quantization (e.g. 'transformer.h.0.mlp.dense_4h_to_h.weight': a subclass of nn.Linear, which "
        "transformers + bitsandbytes do not quantize (FalconLinear)); transformers + bitsandbytes would "
        "load this model unquantized too"
    )
    assert not (tmp_path / "out").exists()


def test_minilm_real_weights(minilm_model):
    infos = read_infos(minilm_model)
    sel = select_tensors(read_config(minilm_model), infos)
    assert len(sel.quantize) == 37  # 6 layers x 6 + pooler (anchors.md)
    assert sel.keep["embeddings.position_ids"] == "buffer"
    assert sel.keep["embeddings.word_embeddings.weight"] == "not nn.Linear (Embedding)"
    assert linear4bit_modules(_load_4bit(minilm_model, sel.skip_modules)) == quantized_modules(sel)


def test_tiny_configs_are_tiny():
    for name, (_, _, kwargs, _) in TINY.items():
        hidden = kwargs.get("hidden_size", kwargs.get("n_embd", kwargs.get("d_model")))
        assert hidden == (72 if name == "llama_odd" else 64), name


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.parametrize(
    ("cfg_cls", "kwargs", "n_quantized"),
    [
        (
            "LlamaConfig",  # Llama-3-8B shapes
            dict(
                hidden_size=4096,
                intermediate_size=14336,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=8,
                vocab_size=128256,
                architectures=["LlamaForCausalLM"],
            ),
            32 * 7,
        ),
        (
            "Qwen3MoeConfig",  # Qwen3-30B-A3B shapes: 128 experts x 48 layers
            dict(
                hidden_size=2048,
                intermediate_size=6144,
                moe_intermediate_size=768,
                num_hidden_layers=48,
                num_attention_heads=32,
                num_key_value_heads=4,
                vocab_size=151936,
                num_experts=128,
                num_experts_per_tok=8,
                architectures=["Qwen3MoeForCausalLM"],
            ),
            48 * 4,
        ),
    ],
)
def test_full_size_configs_select_on_meta(cfg_cls, kwargs, n_quantized):
    """The skeleton lives on the meta device: selecting for a multi-GB model allocates no weights."""
    import time

    from transformers.core_model_loading import revert_weight_conversion

    from converter.plan.selection import build_skeleton
    from converter.sources.base import TensorInfo

    config = getattr(transformers, cfg_cls)(**kwargs).to_dict()
    model = build_skeleton(config)
    sd = revert_weight_conversion(model, model.state_dict())
    infos = [TensorInfo(k, "model.safetensors", "BF16", tuple(v.shape)) for k, v in sd.items()]
    rss, t0 = _rss_bytes(), time.perf_counter()
    sel = select_tensors(config, infos)
    assert time.perf_counter() - t0 < 20
    assert _rss_bytes() - rss < 300 * 2**20
    assert len(sel.quantize) == n_quantized
    assert sel.skip_modules == ["lm_head"]
