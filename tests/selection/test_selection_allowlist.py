"""Selection without transformers: every family of the allowlist is checked against the
transformers-based selection on a tiny model of each of its model types."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.core_model_loading import revert_weight_conversion
from transformers.models.auto import modeling_auto
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.quantizers_utils import should_convert_module

from converter.plan import arch_allowlist
from converter.plan.selection import build_skeleton, select_tensors
from converter.plan.selection_table_gen import TINY_DECODER
from converter.sources.base import TensorInfo

_DECODER = dict(
    TINY_DECODER,
    tie_word_embeddings=False,
    num_experts=4,
    num_local_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    pad_token_id=0,
    bos_token_id=0,
    eos_token_id=0,
)
_ENCODER = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=128
)
_KWARGS = {
    "gpt2": dict(n_embd=64, n_inner=96, n_layer=2, n_head=4, vocab_size=128, bos_token_id=0, eos_token_id=0),
    "t5": dict(d_model=64, d_ff=96, d_kv=16, num_layers=2, num_heads=4, vocab_size=128),
    "mt5": dict(d_model=64, d_ff=96, d_kv=16, num_layers=2, num_heads=4, vocab_size=128),
    "umt5": dict(d_model=64, d_ff=96, d_kv=16, num_layers=2, num_heads=4, vocab_size=128),
    "bert": _ENCODER,
    "roberta": _ENCODER,
    "xlm-roberta": _ENCODER,
}
_ENCODERS = {"bert", "roberta", "xlm-roberta"}
# the class a checkpoint of each type usually comes from
_ARCH_MAPPINGS = (
    modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    modeling_auto.MODEL_MAPPING_NAMES,
)


def _arch(model_type: str) -> str:
    if model_type in _ENCODERS:
        return modeling_auto.MODEL_MAPPING_NAMES[model_type]
    for m in _ARCH_MAPPINGS:
        if model_type in m:
            return m[model_type]
    raise AssertionError(model_type)


def _checkpoint(
    model_type: str, arch: str | None = None, tie: bool = False
) -> tuple[dict, list[TensorInfo], object]:
    """config dict + the tensor list save_pretrained would write (from a meta skeleton, no weights)."""
    kwargs = {**_KWARGS.get(model_type, _DECODER), "tie_word_embeddings": tie}
    cfg = transformers.AutoConfig.for_model(model_type, **kwargs)
    cfg.architectures = [arch or _arch(model_type)]
    config = cfg.to_dict()
    model = build_skeleton(config)
    sd = revert_weight_conversion(model, model.state_dict())
    tied = set(model.all_tied_weights_keys)  # save_pretrained writes only one of tied tensors
    infos = [
        TensorInfo(k, "model.safetensors", "BF16", tuple(v.shape)) for k, v in sd.items() if k not in tied
    ]
    return config, infos, model


def _bnb_would_convert(model, skip_modules: list[str]) -> set[str]:
    """Modules replace_with_bnb_linear swaps given llm_int8_skip_modules (+ _keep_in_fp32_modules)."""
    patterns = list(skip_modules) + list(model._keep_in_fp32_modules or ())
    return {
        n
        for n, m in model.named_modules()
        if (isinstance(m, Conv1D) or type(m) is torch.nn.Linear) and should_convert_module(n, patterns)
    }


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("model_type", arch_allowlist.known_model_types())
def test_allowlist_matches_transformers(model_type, tie):
    config, infos, model = _checkpoint(model_type, tie=tie)
    hf = select_tensors(config, infos, use_transformers=True)
    al = select_tensors(config, infos, use_transformers=False)
    assert al.mode == "allowlist"
    assert set(al.quantize) == set(hf.quantize)
    assert {k: v.transpose for k, v in al.quantize.items()} == {
        k: v.transpose for k, v in hf.quantize.items()
    }
    assert al.keep_fp32 == hf.keep_fp32
    # the allowlist's skip list makes transformers build Linear4bit exactly where it quantized
    assert _bnb_would_convert(model, al.skip_modules) == {k.removesuffix(".weight") for k in al.quantize}


@pytest.mark.parametrize(
    ("model_type", "arch"),
    [
        ("bert", "BertForMaskedLM"),
        ("bert", "BertForSequenceClassification"),
        ("roberta", "RobertaForMaskedLM"),
    ],
)
def test_allowlist_is_a_safe_subset_for_heads(model_type, arch):
    """Task heads are not in the table: fewer weights quantized, but still loaded right."""
    config, infos, model = _checkpoint(model_type, arch)
    hf = select_tensors(config, infos, use_transformers=True)
    al = select_tensors(config, infos, use_transformers=False)
    assert set(al.quantize) < set(hf.quantize)
    assert _bnb_would_convert(model, al.skip_modules) == {k.removesuffix(".weight") for k in al.quantize}


def test_unknown_architecture_without_transformers_names_the_extra():
    config = {"model_type": "falcon_mamba", "architectures": ["FalconMambaForCausalLM"]}
    infos = [TensorInfo("backbone.layers.0.mixer.in_proj.weight", "m.safetensors", "BF16", (128, 64))]
    with pytest.raises(Exception, match=r"falcon_mamba.*pip install 'quantize-model\[transformers\]'"):
        select_tensors(config, infos, use_transformers=False)
