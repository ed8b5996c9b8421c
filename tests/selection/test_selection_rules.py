"""Edge cases of the selection rules and their error messages."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import read_config, read_infos
from torch import nn

import converter.plan.selection as selection
from converter.errors import InputError
from converter.plan.selection import SelectionError, select_tensors
from converter.sources.base import TensorInfo


def _replace(infos, name, **changes):
    return [dataclasses.replace(t, **changes) if t.name == name else t for t in infos]


def test_no_config_needs_include():
    infos = [TensorInfo("a.weight", "m.safetensors", "F16", (64, 64))]
    with pytest.raises(SelectionError, match=r"no config\.json.*--include"):
        select_tensors(None, infos)


def test_no_config_with_include_quantizes_exactly_the_globs():
    infos = [
        TensorInfo("enc.fc1.weight", "m.safetensors", "F16", (64, 64)),
        TensorInfo("enc.fc1.bias", "m.safetensors", "F16", (64,)),
        TensorInfo("enc.fc2.weight", "m.safetensors", "F16", (64, 64)),
        TensorInfo("emb.weight", "m.safetensors", "F16", (100, 64)),
    ]
    sel = select_tensors(None, infos, include=["enc.*"], skip=["*fc2*"])
    assert set(sel.quantize) == {"enc.fc1.weight"}
    assert sel.keep == {
        "enc.fc1.bias": "bias",
        "enc.fc2.weight": "--skip glob '*fc2*'",
        "emb.weight": "not matched by --include",
    }
    assert sel.skip_modules == ["emb", "enc.fc2", "lm_head"]


def test_use_transformers_without_it_names_the_extra(monkeypatch):
    monkeypatch.setattr(selection, "transformers_usable", lambda: False)
    with pytest.raises(SelectionError, match=r"pip install 'quantize-model\[transformers\]'"):
        select_tensors({"model_type": "llama"}, [], use_transformers=True)
    # auto mode falls back to the allowlist
    infos = [TensorInfo("model.layers.0.mlp.down_proj.weight", "m.safetensors", "BF16", (64, 96))]
    sel = select_tensors({"model_type": "llama"}, infos)
    assert sel.mode == "allowlist"
    assert set(sel.quantize) == {"model.layers.0.mlp.down_proj.weight"}


def test_model_type_unknown_to_transformers():
    cfg = {"model_type": "my_private_arch", "architectures": ["MyPrivateForCausalLM"], "auto_map": {}}
    with pytest.raises(SelectionError, match=r"my_private_arch.*never runs a repository's own code"):
        select_tensors(cfg, [], use_transformers=True)


def test_missing_model_type():
    with pytest.raises(SelectionError, match="model_type"):
        select_tensors({"architectures": ["LlamaForCausalLM"]}, [], use_transformers=True)


def test_selection_error_is_an_input_error():
    assert issubclass(SelectionError, InputError)
    assert SelectionError.exit_code == 2


@pytest.mark.parametrize("use_transformers", [True, False])
def test_odd_tensors_are_kept_with_reasons(tiny_checkpoint, use_transformers):
    folder = tiny_checkpoint("llama")
    infos = read_infos(folder)
    infos = _replace(infos, "model.layers.0.self_attn.q_proj.weight", dtype="I8")
    infos = _replace(infos, "model.layers.1.self_attn.q_proj.weight", dtype="F64")
    infos.append(TensorInfo("model.layers.0.self_attn.rotary_emb.inv_freq", "model.safetensors", "F32", (8,)))
    sel = select_tensors(read_config(folder), infos, use_transformers=use_transformers)
    assert sel.keep["model.layers.0.self_attn.q_proj.weight"] == "dtype I8 is not float32/float16/bfloat16"
    assert sel.keep["model.layers.1.self_attn.q_proj.weight"] == "dtype F64 is not float32/float16/bfloat16"
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in sel.keep
    assert len(sel.quantize) == 12


def test_shape_mismatch_and_unknown_keys_are_kept(tiny_checkpoint):
    folder = tiny_checkpoint("llama")
    infos = read_infos(folder)
    infos = _replace(infos, "model.layers.0.mlp.up_proj.weight", shape=(64, 64))
    infos.append(TensorInfo("model.layers.0.mlp.extra_proj.weight", "model.safetensors", "BF16", (64, 64)))
    sel = select_tensors(read_config(folder), infos)
    assert sel.keep["model.layers.0.mlp.up_proj.weight"] == (
        "shape [64, 64] differs from LlamaForCausalLM's [96, 64]"
    )
    assert sel.keep["model.layers.0.mlp.extra_proj.weight"] == (
        "not a parameter of LlamaForCausalLM (transformers drops it on load)"
    )
    assert "layers.0.mlp.up_proj" in sel.skip_modules


def test_keys_without_base_prefix_map_like_transformers(tiny_checkpoint):
    """A checkpoint saved from the bare base model (no "model." prefix) described by a ForCausalLM config:
    transformers adds the prefix on load, and so do we."""
    folder = tiny_checkpoint("llama")
    infos = [dataclasses.replace(t, name=t.name.removeprefix("model.")) for t in read_infos(folder)]
    sel = select_tensors(read_config(folder), infos)
    assert "layers.0.self_attn.q_proj.weight" in sel.quantize
    assert len(sel.quantize) == 14


def test_skip_glob_on_checkpoint_key(tiny_checkpoint):
    folder = tiny_checkpoint("llama")
    sel = select_tensors(read_config(folder), read_infos(folder), skip=["model.layers.1.*"])
    assert {k for k in sel.quantize if ".layers.1." in k} == set()
    assert sel.keep["model.layers.1.self_attn.q_proj.weight"] == "--skip glob 'model.layers.1.*'"
    assert len(sel.quantize) == 7


def test_selection_is_frozen(tiny_checkpoint):
    folder = tiny_checkpoint("bert")
    sel = select_tensors(read_config(folder), read_infos(folder))
    with pytest.raises(dataclasses.FrozenInstanceError):
        sel.mode = "x"  # type: ignore[misc]
    d = selection.as_dict(sel)
    assert d["mode"] == "transformers"
    assert len(d["quantize"]) == 13


def test_architecture_not_in_transformers_uses_the_builtin_class_with_the_same_head(tiny_checkpoint):
    """A config naming a repository-code class of a built-in model_type: the matching Auto class
    builds the skeleton (never the repository's code), so lm_head is still recognised."""
    folder = tiny_checkpoint("llama")
    config = {**read_config(folder), "architectures": ["MyFancyLlamaForCausalLM"], "auto_map": {}}
    sel = select_tensors(config, read_infos(folder))
    assert sel.keep["lm_head.weight"] == "lm_head (output embedding)"
    assert len(sel.quantize) == 14


def test_read_directly_names_linears_of_transformers_classes_that_read_their_weight():
    """Every (class, leaf) of selection_facts.READ_DIRECTLY is a class of this transformers whose
    ``self.<leaf>`` is an nn.Linear, in a modeling file that reads ``<leaf>.weight`` itself or a class that
    hands ``self.<leaf>`` on (a misspelt class or leaf would silently keep nothing 16-bit)."""
    import re
    from pathlib import Path

    import transformers

    from converter.plan.selection_facts import READ_DIRECTLY

    sources = {f: f.read_text() for f in Path(transformers.__file__).parent.glob("models/*/modeling_*.py")}
    for cls, leaf in READ_DIRECTLY:
        files = [text for text in sources.values() if re.search(rf"^class {cls}\(", text, re.M)]
        assert len(files) == 1, cls
        body = re.split(r"^class ", files[0].split(f"\nclass {cls}(", 1)[1], maxsplit=1, flags=re.M)[0]
        assert re.search(rf"self\.{leaf} = nn\.Linear\(", body), (cls, leaf)
        # LayoutLMv3's encoder hands the layer to a helper that reads ``bias.weight``
        assert f"{leaf}.weight" in files[0] or f"self.{leaf}," in body, (cls, leaf)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(4, 4)
        self.o_proj = nn.Linear(4, 4)


class _Layer(nn.Module):
    """Ergo's decoder layer (transformers 5.25) in miniature: inputs cast to a grandchild's weight dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.self_attn = _Attention()
        self.mlp = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch_dtype = self.self_attn.o_proj.weight.dtype
        return self.mlp(x.to(branch_dtype))


def test_read_directly_finds_a_cast_to_a_deeper_linears_weight_dtype():
    """Ergo's decoder layer casts its attention and MLP inputs to ``self.self_attn.o_proj.weight.dtype``:
    only a parent's ``self.<leaf>.weight.dtype`` was looked for, so o_proj was quantized and both loaders
    failed ("value cannot be converted to type uint8_t without overflow"). The path from any ancestor
    counts; the linears it does not name stay quantizable."""
    from converter.plan.selection_facts import read_directly

    modules = dict(nn.ModuleDict({"layers": nn.ModuleList([_Layer()])}).named_modules())
    assert read_directly("layers.0.self_attn.o_proj", modules) == (
        "read directly (_Layer casts its input to self_attn.o_proj.weight.dtype)"
    )
    assert read_directly("layers.0.self_attn.q_proj", modules) is None
    assert read_directly("layers.0.mlp", modules) is None
