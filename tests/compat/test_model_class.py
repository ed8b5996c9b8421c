"""The converter and the loader build the same model class (converter/plan/model_class.py) when
config.json names none, or one transformers lacks, and handle the base-model prefix as transformers
does: the output loads and runs with transformers + bitsandbytes and with our loader."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from converter.loader.model import linear4bit_modules, load_quantized
from converter.writer.pipeline import convert

bnb = pytest.importorskip("bitsandbytes")

IDS = torch.tensor([[1, 2, 3, 4, 5]])
# every width a multiple of 64: bitsandbytes' CPU kernels need whole blocks per row
SMALL = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=128
)


def _save(model: Any, folder: Path, architectures: list[str] | None) -> Path:
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("architectures", None)
    if architectures is not None:
        config["architectures"] = architectures
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _convert(src: Path, tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / (src.name + "-nf4")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(src, out, progress=False)
    return out, json.loads((out / "config.json").read_text())["quantization_config"]


def _bnb_run(auto: str, folder: Path, **inputs: Any) -> tuple[str, set[str]]:
    """transformers + bitsandbytes: the class built, its 4-bit modules (after one forward)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, auto).from_pretrained(folder, device_map="cpu").eval()
    with torch.no_grad():
        out = model(IDS, **inputs)
    assert torch.isfinite(out.logits).all()
    return type(model).__name__, {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def _ours(folder: Path, **inputs: Any) -> tuple[str, set[str]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_quantized(folder, dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(IDS, **inputs).logits).all()
    return type(model).__name__, set(linear4bit_modules(model))


@pytest.mark.filterwarnings("ignore")
def test_causal_lm_without_architectures_keeps_its_head(tmp_path: Path) -> None:
    # The converter chose the layers from MistralModel: the skip list lacked lm_head, and
    # AutoModelForCausalLM.from_pretrained built a 4-bit lm_head holding a bf16 weight (an
    # AssertionError in bitsandbytes at the first forward).
    cfg = transformers.MistralConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    src = _save(transformers.MistralForCausalLM(cfg).to(torch.bfloat16), tmp_path / "mistral", None)
    out, qc = _convert(src, tmp_path)
    assert "lm_head" in qc["llm_int8_skip_modules"]
    name, theirs = _bnb_run("AutoModelForCausalLM", out)
    assert name == "MistralForCausalLM"
    assert "lm_head" not in theirs
    assert _ours(out) == (name, theirs)


@pytest.mark.filterwarnings("ignore")
def test_masked_lm_without_architectures(tmp_path: Path) -> None:
    # BERT's MLM head: its decoder (tied to the word embeddings) stays a plain Linear
    torch.manual_seed(0)
    src = _save(transformers.BertForMaskedLM(transformers.BertConfig(**SMALL)), tmp_path / "bert", None)
    out, qc = _convert(src, tmp_path)
    assert "cls.predictions.decoder" in qc["llm_int8_skip_modules"]
    name, theirs = _bnb_run("AutoModelForMaskedLM", out)
    assert name == "BertForMaskedLM"
    assert "cls.predictions.decoder" not in theirs
    assert _ours(out) == (name, theirs)


@pytest.mark.filterwarnings("ignore")
def test_pretraining_heads_without_architectures(tmp_path: Path) -> None:
    # BertForPreTraining's checkpoint: MLM decoder and next-sentence head (cls.seq_relationship) too
    torch.manual_seed(0)
    src = _save(transformers.BertForPreTraining(transformers.BertConfig(**SMALL)), tmp_path / "bert", None)
    out, qc = _convert(src, tmp_path)
    assert "cls.predictions.decoder" in qc["llm_int8_skip_modules"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = transformers.AutoModelForPreTraining
        model = auto.from_pretrained(out, device_map="cpu")
        on_load = auto.from_pretrained(  # transformers + bnb quantizing the plain checkpoint itself
            src, quantization_config=transformers.BitsAndBytesConfig(load_in_4bit=True), device_map="cpu"
        )
        ours = load_quantized(out, dtype=torch.float32)
    theirs = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert theirs == {n for n, m in on_load.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert type(ours) is transformers.BertForPreTraining
    assert set(linear4bit_modules(ours)) == theirs
    with torch.no_grad():
        assert torch.isfinite(ours(IDS).prediction_logits).all()


@pytest.mark.filterwarnings("ignore")
def test_encoder_decoder_without_architectures(tmp_path: Path) -> None:
    # our loader took AutoModelForCausalLM's BartForCausalLM, which has no encoder for the weights
    cfg = transformers.BartConfig(
        d_model=64, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=128, decoder_ffn_dim=128,
        encoder_attention_heads=4, decoder_attention_heads=4, vocab_size=128, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    src = _save(transformers.BartForConditionalGeneration(cfg), tmp_path / "bart", None)
    out, qc = _convert(src, tmp_path)
    assert "lm_head" in qc["llm_int8_skip_modules"]
    name, theirs = _bnb_run("AutoModelForSeq2SeqLM", out, decoder_input_ids=IDS)
    assert name == "BartForConditionalGeneration"
    assert _ours(out, decoder_input_ids=IDS) == (name, theirs)


@pytest.mark.filterwarnings("ignore")
def test_unknown_architecture_name_builds_its_head(tmp_path: Path) -> None:
    # the converter mapped the name to the classification head; our loader built RobertaForCausalLM
    cfg = transformers.RobertaConfig(**SMALL, num_labels=64, max_position_embeddings=70)  # bnb CPU: 32 | rows
    torch.manual_seed(0)
    model = transformers.RobertaForSequenceClassification(cfg)
    src = _save(model, tmp_path / "roberta", ["MyRobertaForSequenceClassification"])
    out, _ = _convert(src, tmp_path)
    name, theirs = _bnb_run("AutoModelForSequenceClassification", out)
    assert name == "RobertaForSequenceClassification"
    assert _ours(out) == (name, theirs)
    assert {"classifier.dense", "roberta.encoder.layer.0.attention.self.query"} <= theirs


def test_base_model_prefix_is_stripped_like_transformers(tmp_path: Path) -> None:
    # `roberta.*` keys under architectures ["RobertaModel"]: transformers strips the prefix; our loader
    # raised CheckpointMismatchError
    cfg = transformers.RobertaConfig(**SMALL, max_position_embeddings=70)
    torch.manual_seed(0)
    src = _save(transformers.RobertaModel(cfg), tmp_path / "roberta", ["RobertaModel"])
    state = load_file(src / "model.safetensors")
    save_file({f"roberta.{k}": v for k, v in state.items()}, src / "model.safetensors", {"format": "pt"})
    out, _ = _convert(src, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = transformers.RobertaModel.from_pretrained(src).eval()
        ours = load_quantized(out, dtype=torch.float32)
    assert type(ours) is transformers.RobertaModel
    assert "encoder.layer.0.attention.self.query" in linear4bit_modules(ours)
    with torch.no_grad():
        want, got = plain(IDS).last_hidden_state, ours(IDS).last_hidden_state
    assert torch.equal(ours.embeddings.word_embeddings.weight, plain.embeddings.word_embeddings.weight)
    assert (got - want).abs().max() < 0.5  # 4-bit weights: close, not equal
