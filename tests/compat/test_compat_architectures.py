"""Many more architectures than test_compat_transformers.py's six: for each tiny random model (decoders
with biases, fused q/k/v, parallel blocks, MLA and MoE; encoders; encoder-decoders; vision and
vision-language models; a state-space model) our NF4 and int8 folders hold the same tensors, byte for
byte, as transformers + bitsandbytes' own ``save_pretrained`` of the same source, transformers builds
its Linear4bit / Linear8bitLt layers at the same modules from both folders, and ``load_quantized``
builds one of ours at each of them. Non-nested NF4 only: there bitsandbytes' CPU bytes are exact
(nested absmax and FP4 differ by counted codes, tested on the six in test_compat_transformers.py).
One deliberate difference: Mamba's ``dt_proj``, which MambaMixer multiplies by itself, stays 16-bit in
our folders (quantized, transformers + bitsandbytes' own folder fails in its forward)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import bitsandbytes as bnb
import pytest
import torch
import transformers
from tiny_models import load_logged, read_tensors, skip_unless_built_in

from converter.loader.model import load_quantized
from converter.loader.module import QuantLinear4bit
from converter.loader.module_int8 import QuantLinear8bit
from converter.writer.pipeline import convert

_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
_TEXT = dict(
    **_SIZES,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=0,
    eos_token_id=1,
)
_VISION = dict(**_SIZES, image_size=32, patch_size=8)
_CLIP_TEXT = dict(**_SIZES, vocab_size=128, max_position_embeddings=32)
_SEQ2SEQ = dict(  # BART, Whisper
    d_model=64,
    encoder_ffn_dim=128,
    decoder_ffn_dim=128,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    vocab_size=128,
)


def _for_model(model_type: str, **kwargs: Any) -> Callable[[], Any]:
    return lambda: transformers.AutoConfig.for_model(model_type, **kwargs)


def _new_in_5_25(model_type: str, arch: str, **kwargs: Any) -> Callable[[], Any]:
    """A model type transformers 5.25 added: the test skips where the installed transformers lacks it."""

    def make() -> Any:
        skip_unless_built_in(model_type, arch)
        return transformers.AutoConfig.for_model(model_type, **kwargs)

    return make


_QWEN3_TEXT = dict(_TEXT, model_type="qwen3", head_dim=16)
_MOE_5_25 = dict(_TEXT, head_dim=16, moe_intermediate_size=64, num_experts_per_tok=2)

# name -> (architecture, config factory)
ARCHITECTURES: dict[str, tuple[str, Callable[[], Any]]] = {
    "qwen2": ("Qwen2ForCausalLM", _for_model("qwen2", **_TEXT)),  # q/k/v biases
    "qwen3": ("Qwen3ForCausalLM", _for_model("qwen3", **_TEXT, head_dim=16)),
    "mistral": ("MistralForCausalLM", _for_model("mistral", **_TEXT)),
    "gemma2": ("Gemma2ForCausalLM", _for_model("gemma2", **_TEXT, head_dim=16)),
    "gemma3_text": ("Gemma3ForCausalLM", _for_model("gemma3_text", **_TEXT, head_dim=16)),
    "phi3": ("Phi3ForCausalLM", _for_model("phi3", **_TEXT)),  # fused qkv_proj, gate_up_proj
    "phi": ("PhiForCausalLM", _for_model("phi", **_TEXT)),
    "gpt_neox": ("GPTNeoXForCausalLM", _for_model("gpt_neox", **_TEXT)),  # fused query_key_value
    "starcoder2": ("Starcoder2ForCausalLM", _for_model("starcoder2", **_TEXT)),
    "olmo2": ("Olmo2ForCausalLM", _for_model("olmo2", **_TEXT)),
    # norms without weights and a tied head: the last parameter of the tied model is the last layer's
    # down_proj, which transformers quantizes (its skip list is computed before the head is tied)
    "olmo_tied": ("OlmoForCausalLM", _for_model("olmo", **dict(_TEXT, tie_word_embeddings=True))),
    "cohere": ("CohereForCausalLM", _for_model("cohere", **_TEXT)),
    "granite": ("GraniteForCausalLM", _for_model("granite", **_TEXT)),
    "stablelm": ("StableLmForCausalLM", _for_model("stablelm", **_TEXT)),
    "opt": (
        "OPTForCausalLM",
        _for_model(
            "opt",
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=128,
            max_position_embeddings=64,
            word_embed_proj_dim=64,
        ),
    ),
    "bloom": ("BloomForCausalLM", _for_model("bloom", hidden_size=64, n_layer=2, n_head=4, vocab_size=128)),
    "gptj": (
        "GPTJForCausalLM",
        _for_model("gptj", n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, rotary_dim=8),
    ),
    "glm4": ("Glm4ForCausalLM", _for_model("glm4", **_TEXT, head_dim=16)),
    "olmoe": ("OlmoeForCausalLM", _for_model("olmoe", **_TEXT, num_experts=4, num_experts_per_tok=2)),
    "deepseek_v3": (  # MLA attention, shared experts, a dense first layer
        "DeepseekV3ForCausalLM",
        _for_model(
            "deepseek_v3",
            **_TEXT,
            moe_intermediate_size=32,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=32,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            n_group=1,
            topk_group=1,
        ),
    ),
    "roberta": (
        "RobertaModel",
        _for_model(
            "roberta",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=128,
        ),
    ),
    "mobilebert": (  # its MLM head reads cls.predictions.dense.weight (KEPT_WHERE_BNB_BREAKS)
        "MobileBertForMaskedLM",
        _for_model(
            "mobilebert",
            vocab_size=128,
            hidden_size=128,
            embedding_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            intra_bottleneck_size=64,
            true_hidden_size=64,
        ),
    ),
    "distilbert": (
        "DistilBertModel",
        _for_model("distilbert", dim=64, hidden_dim=128, n_layers=2, n_heads=4, vocab_size=128),
    ),
    "deberta_v2": (
        "DebertaV2Model",
        _for_model(
            "deberta-v2",
            **_SIZES,
            vocab_size=128,
        ),
    ),
    "bart": (
        "BartForConditionalGeneration",
        _for_model(
            "bart",
            **_SEQ2SEQ,
            max_position_embeddings=64,
        ),
    ),
    "whisper": (
        "WhisperForConditionalGeneration",
        _for_model(
            "whisper",
            **_SEQ2SEQ,
            num_mel_bins=16,
            max_source_positions=32,
            max_target_positions=32,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        ),
    ),
    "vit": ("ViTModel", lambda: transformers.ViTConfig(**_VISION)),
    "clip": (
        "CLIPModel",
        lambda: transformers.CLIPConfig(text_config=_CLIP_TEXT, vision_config=_VISION, projection_dim=32),
    ),
    "siglip": (
        "SiglipModel",
        lambda: transformers.SiglipConfig(text_config=_CLIP_TEXT, vision_config=_VISION),
    ),
    "llava": (
        "LlavaForConditionalGeneration",
        lambda: transformers.LlavaConfig(
            vision_config=transformers.CLIPVisionConfig(**_VISION),
            text_config=transformers.LlamaConfig(**_TEXT, head_dim=16),
            image_token_index=3,
        ),
    ),
    "gemma3": (
        "Gemma3ForConditionalGeneration",
        lambda: transformers.Gemma3Config(
            vision_config=_VISION,
            text_config=dict(_TEXT, head_dim=16),
            mm_tokens_per_image=4,
            image_token_index=3,
        ),
    ),
    "mamba": (
        "MambaForCausalLM",
        lambda: transformers.MambaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=128, state_size=8),
    ),
    # transformers 5.25's new model types (skipped before)
    "llava_onevision1_5": (  # a RICE-ViT tower (fused qkv), a patch merger, a Qwen3 text model
        "LlavaOnevision15ForConditionalGeneration",
        _new_in_5_25(
            "llava_onevision1_5",
            "LlavaOnevision15ForConditionalGeneration",
            text_config=_QWEN3_TEXT,
            vision_config=dict(
                depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=8, out_hidden_size=64
            ),
            image_token_id=120,
            video_token_id=121,
            vision_start_token_id=122,
            vision_end_token_id=123,
        ),
    ),
    "ovis2_5": (  # a SigLIP-style tower, a visual tokenizer head and embedding table, a Qwen3 text model
        "Ovis2_5ForConditionalGeneration",
        _new_in_5_25(
            "ovis2_5",
            "Ovis2_5ForConditionalGeneration",
            text_config=_QWEN3_TEXT,
            vision_config=dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                patch_size=8,
                image_size=32,
                window_size=16,
                vocab_size=68,
                max_position_embeddings=64,
            ),
            image_token_id=120,
            video_token_id=121,
            image_start_token_id=122,
            image_end_token_id=123,
            video_start_token_id=124,
            video_end_token_id=125,
        ),
    ),
    "pi05": (  # PaliGemma (SigLIP + Gemma) beside a Gemma action expert with adaptive RMSNorms (dense)
        "PI05ForConditionalGeneration",
        _new_in_5_25(
            "pi05",
            "PI05ForConditionalGeneration",
            vlm_config=dict(
                model_type="paligemma",
                text_config=dict(
                    model_type="gemma", **_SIZES, num_key_value_heads=1, head_dim=32, vocab_size=128
                ),
                vision_config=dict(model_type="siglip_vision_model", **_VISION, vision_use_head=False),
                projection_dim=64,
                image_token_id=127,
            ),
            dit_config=dict(model_type="gemma", **_SIZES, num_key_value_heads=1, head_dim=32),
            chunk_size=4,
            max_action_dim=64,
        ),
    ),
    "minicpm5_moe": (  # its q_proj renamed q_gate_proj on load; experts kept 16-bit
        "MiniCPM5MoeForCausalLM",
        _new_in_5_25(
            "minicpm5_moe",
            "MiniCPM5MoeForCausalLM",
            **_MOE_5_25,
            n_routed_experts=4,
            n_shared_experts=1,
            mlp_layer_types=["dense", "sparse"],
        ),
    ),
    "kolibri1_1": (  # sliding and indexed attention; experts kept 16-bit
        "Kolibri1_1ForCausalLM",
        _new_in_5_25(
            "kolibri1_1",
            "Kolibri1_1ForCausalLM",
            **_MOE_5_25,
            num_experts=4,
            shared_expert_intermediate_size=64,
            mlp_only_layers=[0],
            mlp_only_intermediate_size=128,
            layer_types=["sliding_attention", "indexed_attention"],
            sliding_window=8,
            index_num_heads=2,
        ),
    ),
}

#: Modules our folders keep 16-bit where transformers + bitsandbytes quantize them and then fail in their
#: own forward (converter/plan/selection_facts.py READ_DIRECTLY), by architecture: module-name suffixes.
KEPT_WHERE_BNB_BREAKS = {"mamba": (".mixer.dt_proj",), "mobilebert": ("cls.predictions.dense",)}


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


#: per quant type: transformers' config, its layer class, ours
_QUANT = {
    "nf4": (
        lambda: transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=False,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
        "Linear4bit",
        QuantLinear4bit,
    ),
    "int8": (lambda: transformers.BitsAndBytesConfig(load_in_8bit=True), "Linear8bitLt", QuantLinear8bit),
}


def _modules(model: torch.nn.Module, cls: type | str) -> set[str]:
    if isinstance(cls, str):
        cls = getattr(bnb.nn, cls)
    return {n for n, m in model.named_modules() if isinstance(m, cls)}


def _record_key(key: str, module: str) -> bool:
    """Whether ``key`` belongs to bitsandbytes' 4-bit or int8 record of linear ``module``."""
    record = {f"{module}.weight", f"{module}.SCB", f"{module}.weight_format"}
    return key in record or key.startswith(f"{module}.weight.")


@pytest.mark.parametrize("quant_type", sorted(_QUANT))
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_folder_equals_transformers_bitsandbytes_save(tmp_path, name, quant_type):
    arch, make_config = ARCHITECTURES[name]
    config = make_config()
    config.architectures = [arch]
    torch.manual_seed(0)
    src = tmp_path / "src"
    getattr(transformers, arch)(config).to(torch.bfloat16).eval().save_pretrained(src)

    ours = tmp_path / "ours"
    options = {"double_quant": False, "compute_dtype": "bfloat16"} if quant_type == "nf4" else {}
    convert(str(src), str(ours), quant_type=quant_type, progress=False, **options)
    make_qc, bnb_class, our_class = _QUANT[quant_type]
    bnb_model, _, _ = load_logged(src, quantization_config=make_qc())
    bnb_model.save_pretrained(tmp_path / "bnb")

    ours_t, ref_t = read_tensors(ours), read_tensors(tmp_path / "bnb")
    kept = KEPT_WHERE_BNB_BREAKS.get(name, ())
    if kept:  # ours holds the source weight there; bnb's record of it is left out of the comparison
        source_t = read_tensors(src)
        mods = {k.removesuffix(".weight") for k in source_t if k.endswith(tuple(s + ".weight" for s in kept))}
        assert mods, f"{name}: no module ends with {kept}"
        for m in mods:
            assert torch.equal(_as_bytes(ours_t.pop(m + ".weight")), _as_bytes(source_t[m + ".weight"]))
        ref_t = {k: v for k, v in ref_t.items() if not any(_record_key(k, m) for m in mods)}
    # we copy every source tensor; transformers drops non-persistent buffers (position_ids)
    assert set(ref_t) <= set(ours_t)
    assert {k for k in set(ours_t) - set(ref_t) if not k.endswith("position_ids")} == set()
    differing = [
        k
        for k in ref_t
        if ours_t[k].dtype != ref_t[k].dtype
        or ours_t[k].shape != ref_t[k].shape
        or not torch.equal(_as_bytes(ours_t[k]), _as_bytes(ref_t[k]))
    ]
    assert differing == []

    ours_model, info, _ = load_logged(ours)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[kind], (kind, info[kind])
    quantized = {m for m in _modules(bnb_model, bnb_class) if not m.endswith(kept)}
    assert quantized, "transformers + bitsandbytes quantized nothing: not a test of the selection"
    assert _modules(ours_model, bnb_class) == quantized
    assert _modules(load_quantized(ours, dtype=torch.bfloat16), our_class) == quantized


def _vlm_inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A 32x32 image (16 patches of 8x8, merged 2x2 into 4 image tokens) among text tokens."""
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[1, 5, 122, 120, 120, 120, 120, 123, 9, 33, 2, 100]])
    pixels = torch.randn(16, 3 * 8 * 8, generator=g).to(model.dtype)
    return dict(input_ids=ids, pixel_values=pixels, image_grid_thw=torch.tensor([[1, 4, 4]]))


def _pi05_inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """One 32x32 camera image (16 image tokens), text, a noisy action chunk and its flow-matching time."""
    g = torch.Generator().manual_seed(0)
    return dict(
        input_ids=torch.tensor([[127] * 16 + [1, 5, 9, 33, 2, 100]]),
        pixel_values=torch.randn(1, 1, 3, 32, 32, generator=g).to(model.dtype),
        pixel_attention_mask=torch.ones(1, 1, dtype=torch.bool),
        noise=torch.randn(1, 4, 64, generator=g).to(model.dtype),
        timestep=torch.tensor([0.5]),
    )


#: transformers 5.25's new dense models with their multimodal inputs
_RUN_5_25 = {"llava_onevision1_5": _vlm_inputs, "ovis2_5": _vlm_inputs, "pi05": _pi05_inputs}


@pytest.mark.parametrize("quant_type", sorted(_QUANT))
@pytest.mark.parametrize("name", sorted(_RUN_5_25))
def test_new_multimodal_models_run_in_both_loaders(tmp_path, name, quant_type):
    """LLaVA-OneVision-1.5, Ovis2.5 and PI0.5 (transformers 5.25) with an image: stock transformers +
    bitsandbytes runs our folder; load_quantized's outputs on its dequantize path equal those of the
    `quantize-model dequantize` folder in transformers bit for bit (logits; PI0.5: its action velocity,
    and sample_actions), and so does greedy generate; its default (GEMV) path runs."""
    from converter.loader.dequantize import dequantize_checkpoint

    arch, make_config = ARCHITECTURES[name]
    config = make_config()
    config.architectures = [arch]
    cls = getattr(transformers, arch)
    torch.manual_seed(0)
    cls(config).to(torch.bfloat16).eval().save_pretrained(tmp_path / "src")
    folder = tmp_path / quant_type
    convert(str(tmp_path / "src"), str(folder), quant_type=quant_type, progress=False, warn=lambda _: None)
    dequantize_checkpoint(folder, tmp_path / "plain")
    make_inputs = _RUN_5_25[name]

    stock, info, _ = load_logged(folder)
    assert not any(info.values()), info
    with torch.no_grad():
        assert torch.isfinite(stock(**make_inputs(stock)).logits).all()

    ours = load_quantized(folder, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.isfinite(ours(**make_inputs(ours)).logits).all()  # the GEMV path
    for layer in ours.modules():
        if hasattr(layer, "use_gemv"):
            layer.use_gemv = False
    plain = cls.from_pretrained(tmp_path / "plain", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        assert torch.equal(ours(**make_inputs(ours)).logits, plain(**make_inputs(plain)).logits)
    if name == "pi05":
        kw = {k: v for k, v in make_inputs(ours).items() if k != "timestep"}
        assert torch.equal(ours.sample_actions(**kw), plain.sample_actions(**kw))
    else:
        kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        ids = torch.tensor([[1, 5, 9, 33]])
        assert torch.equal(ours.generate(ids, **kw), plain.generate(ids, **kw))
