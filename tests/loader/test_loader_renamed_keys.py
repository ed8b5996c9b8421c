"""Checkpoints whose keys transformers renames on load (the vision-language models: save_pretrained of
transformers 5 writes Qwen2-VL's ``model.layers.*`` and LLaVA's / Gemma 3's ``language_model.model.*``,
the model has ``model.language_model.*``): load_quantized renames the 4-bit records as it renames the
plain tensors, so it loads what transformers + bitsandbytes load, with the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from bnb_cpu_path import bnb_generic_cpu_path
from tiny_models import linear4bit_modules, load_logged

from converter import load_quantized
from converter.loader.model import linear4bit_modules as our_linear4bit_modules
from converter.writer.pipeline import convert

_TEXT = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
_CLIP = dict(
    model_type="clip_vision_model",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=28,
    patch_size=14,
)
_MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
CONFIGS = {
    "qwen2_vl": lambda: transformers.Qwen2VLConfig(
        text_config=dict(_TEXT, rope_parameters=_MROPE),
        vision_config=dict(depth=2, embed_dim=64, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14),
        image_token_id=100,
        video_token_id=101,
        vision_start_token_id=102,
        vision_end_token_id=103,
        architectures=["Qwen2VLForConditionalGeneration"],
    ),
    "llava": lambda: transformers.LlavaConfig(
        text_config=dict(_TEXT, model_type="llama"),
        vision_config=_CLIP,
        image_token_index=100,
        vision_feature_layer=-1,
        architectures=["LlavaForConditionalGeneration"],
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_vision_language_checkpoint_loads_like_transformers(
    tmp_path: Path, name: str, quant_type: str
) -> None:
    config = CONFIGS[name]()
    torch.manual_seed(0)
    model = getattr(transformers, config.architectures[0])(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "out", quant_type=quant_type, progress=False)

    ref, info, _ = load_logged(tmp_path / "out")
    assert not any(info.values()), info
    bnb_generic_cpu_path(ref)
    ours = load_quantized(tmp_path / "out", dtype=torch.bfloat16)
    assert type(ours) is type(ref)
    if quant_type == "nf4":
        assert set(our_linear4bit_modules(ours)) == linear4bit_modules(ref)
        for m in ours.modules():
            if hasattr(m, "use_gemv"):
                m.use_gemv = False  # bitsandbytes' dequantize + bf16 F.linear, bit for bit, on any CPU
    else:
        for m in ours.modules():
            if hasattr(m, "exact"):
                m.exact = True  # bitsandbytes' int8 matmul, bit for bit
    ids = torch.tensor([[5, 17, 3, 99, 42, 7, 64, 1, 120, 33]])  # 10 tokens: the dequantize path
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_int8_weight_renamed_apart_from_its_scb_stays_16bit(tmp_path: Path) -> None:
    """UnlimitedOcr's checkpoint spells its projector ``model.projector.layers``; transformers renames
    ``projector.layers.weight`` (and ``.bias``) to ``multi_modal_projector`` on load, not the module's
    ``SCB``: an int8 projector came apart from its scale, transformers + bitsandbytes reported the weight
    unexpected and ran with the projector uninitialised (ours loaded it). It stays 16-bit with the
    reason a 4-bit weight renamed apart from its state has; both loaders hold the source's weight."""
    from safetensors import safe_open

    text = dict(_TEXT, num_key_value_heads=2, head_dim=16, n_routed_experts=4, num_experts_per_tok=2)
    text.update(moe_intermediate_size=64, vocab_size=512, mlp_layer_types=["dense", "sparse"])
    text["layer_types"] = ["reference_sliding_attention"] * 2
    sam = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=64)
    encoder = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=56
    )
    config = transformers.UnlimitedOcrConfig(
        text_config=text,
        vision_config=dict(sam_config=sam, encoder_config=encoder),
        architectures=["UnlimitedOcrForConditionalGeneration"],
    )
    torch.manual_seed(0)
    transformers.UnlimitedOcrForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(
        tmp_path / "src"
    )
    convert(tmp_path / "src", tmp_path / "out", quant_type="int8", progress=False)

    with safe_open(str(tmp_path / "src" / "model.safetensors"), "pt") as f:
        source = f.get_tensor("model.projector.layers.weight")
    report = json.loads((tmp_path / "out" / "quantization_report.json").read_text())
    actions = {t["name"]: (t["action"], t.get("reason")) for t in report["tensors"]}
    assert actions["model.projector.layers.weight"] == (
        "keep",
        "renamed on load in a way its quantization state would not follow",
    )
    ref, info, _ = load_logged(tmp_path / "out")
    assert not any(info.values()), info
    ours = load_quantized(tmp_path / "out", dtype=torch.bfloat16)
    assert torch.equal(ref.model.multi_modal_projector.weight, source)
    assert torch.equal(ours.model.multi_modal_projector.weight, source)
