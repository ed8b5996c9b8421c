"""Tied weights stored twice: a checkpoint whose config ties lm_head to the input embedding
(tie_word_embeddings=True) but whose shards hold both ``lm_head.weight`` and
``model.embed_tokens.weight``.

transformers' ``from_pretrained`` ties the pair when the two values are equal (``save_pretrained`` then
writes the input embedding only) and, when they differ, warns and keeps both untied.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tiny_models import load_logged, read_tensors

from converter.loader.model import load_quantized
from converter.writer.pipeline import convert

HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"


def _tied_source_with_head(tiny_checkpoint, folder: Path, equal: bool) -> dict[str, torch.Tensor]:
    """llama_tied (float32) with lm_head.weight stored as well: a copy of the embedding or other values."""
    shutil.copytree(tiny_checkpoint("llama_tied"), folder)
    tensors = read_tensors(folder)
    assert HEAD not in tensors  # save_pretrained writes a tied pair once
    embed = tensors[EMBED]
    torch.manual_seed(1)
    tensors[HEAD] = embed.clone() if equal else torch.randn_like(embed) * 0.02
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return tensors


def test_untied_values_load_untied_like_transformers(tiny_checkpoint, tmp_path: Path) -> None:
    """Different values under a tying config: transformers keeps both; load_quantized must too
    (it tied them, so lm_head silently became the input embedding)."""
    tensors = _tied_source_with_head(tiny_checkpoint, tmp_path / "src", equal=False)
    convert(tmp_path / "src", tmp_path / "ours", progress=False)
    written = read_tensors(tmp_path / "ours")
    assert torch.equal(written[HEAD], tensors[HEAD])
    assert torch.equal(written[EMBED], tensors[EMBED])
    hf, _, messages = load_logged(tmp_path / "ours")
    assert any("we will NOT tie them" in m for m in messages)
    assert torch.equal(hf.lm_head.weight, tensors[HEAD])
    ours = load_quantized(tmp_path / "ours", dtype=torch.float32)
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    assert torch.equal(ours.lm_head.weight, tensors[HEAD])
    assert torch.equal(ours.model.embed_tokens.weight, tensors[EMBED])


def test_equal_values_load_tied(tiny_checkpoint, tmp_path: Path) -> None:
    tensors = _tied_source_with_head(tiny_checkpoint, tmp_path / "src", equal=True)
    convert(tmp_path / "src", tmp_path / "ours", progress=False)
    ours = load_quantized(tmp_path / "ours", dtype=torch.float32)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert torch.equal(ours.lm_head.weight, tensors[EMBED])


def test_equal_tied_copy_is_written_once_like_save_pretrained(tiny_checkpoint, tmp_path: Path) -> None:
    """Both tensors stored with equal values: bitsandbytes' save_pretrained writes the input embedding
    only; we wrote the head too (a vocab x hidden copy: here 16 of 70 kB, bits per parameter counted
    over both). Same tensors as bnb's folder now, and both loaders tie the head to the embedding."""
    import json

    import transformers

    tensors = _tied_source_with_head(tiny_checkpoint, tmp_path / "src", equal=True)
    messages: list[str] = []
    convert(tmp_path / "src", tmp_path / "ours", double_quant=False, progress=False, warn=messages.append)
    qc = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    ref, _, _ = load_logged(tmp_path / "src", quantization_config=qc)
    ref.save_pretrained(tmp_path / "bnb")
    ours_t, ref_t = read_tensors(tmp_path / "ours"), read_tensors(tmp_path / "bnb")
    assert HEAD not in ref_t
    assert set(ours_t) == set(ref_t)
    assert torch.equal(ours_t[EMBED], tensors[EMBED])
    assert any(HEAD in m and "written once" in m for m in messages), messages
    report = json.loads((tmp_path / "ours" / "quantization_report.json").read_text())
    assert HEAD not in json.dumps(report.get("tensors", report))
    hf, info, _ = load_logged(tmp_path / "ours")
    assert not info["missing_keys"]
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    ours = load_quantized(tmp_path / "ours", dtype=torch.float32)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert torch.equal(ours.lm_head.weight, tensors[EMBED])
