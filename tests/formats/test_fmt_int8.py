"""The LLM.int8 records in formats: key groups in bnb-made and our shards, strict errors, split shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from formats.int8 import Int8Tensor, int8_layout, quantization_config, quantize_int8
from formats.reader import open_checkpoint, open_shard
from formats.validate import MissingQuantComponent, QuantLayoutMismatch, UnexpectedQuantComponent


def _bnb_keys(prefix: str = "model.layers.0.mlp.up_proj", rows: int = 6, cols: int = 10) -> dict:
    q, scb = quantize_int8((torch.randn(rows, cols) * 0.05).numpy())
    return {
        f"{prefix}.weight": torch.from_numpy(q),
        f"{prefix}.SCB": torch.from_numpy(scb),
        f"{prefix}.weight_format": torch.tensor(0, dtype=torch.uint8),
        f"{prefix}.bias": torch.zeros(rows, dtype=torch.bfloat16),
    }


def test_bnb_made_shard_reads_as_int8_records(tmp_path: Path) -> None:
    tensors = {**_bnb_keys(), "model.norm.weight": torch.ones(10, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    shard = open_shard(tmp_path / "model.safetensors")
    assert shard.quantized == ["model.layers.0.mlp.up_proj.weight"]
    assert sorted(shard.passthrough) == ["model.layers.0.mlp.up_proj.bias", "model.norm.weight"]
    rec = shard.record("model.layers.0.mlp.up_proj.weight")
    assert isinstance(rec, Int8Tensor)
    assert rec.shape == (6, 10)
    assert rec.dtype is None  # bnb keys carry no dtype; our metadata does
    assert torch.equal(rec.codes, tensors["model.layers.0.mlp.up_proj.weight"])
    assert list(rec.state_dict()) == list(int8_layout("model.layers.0.mlp.up_proj.weight", (6, 10)))


@pytest.mark.parametrize(
    ("edit", "error", "fragment"),
    [
        (lambda t: t.update({"m.SCB": torch.zeros(5)}), QuantLayoutMismatch, "'m.SCB': expected F32 \\[6\\]"),
        (lambda t: t.update({"m.weight": t["m.weight"].float()}), QuantLayoutMismatch, "must be I8"),
        (lambda t: t.pop("m.weight"), MissingQuantComponent, "int8 weight missing"),
        (lambda t: t.pop("m.SCB"), MissingQuantComponent, r"has 'm\.weight_format' but no 'm\.SCB'"),
        (lambda t: t.update({"m.weight_format": torch.tensor(2, dtype=torch.uint8)}),
         UnexpectedQuantComponent, "tiled layout"),
        (lambda t: t.update({"m.weight_format": torch.zeros(1, dtype=torch.uint8)}), QuantLayoutMismatch,
         "U8 scalar"),
        # keys under the group's keys were dropped with an "unused tensor" warning; 4-bit refuses them
        (lambda t: t.update({"m.weight.absmax": torch.ones(6)}), UnexpectedQuantComponent,
         r"'m\.weight': unexpected keys \['m\.weight\.absmax'\] under the int8 weight"),
        (lambda t: t.update({"m.weight.SCB": torch.ones(6)}), UnexpectedQuantComponent,
         r"unexpected keys \['m\.weight\.SCB'\]"),
        (lambda t: t.update({"m.SCB.weight_format": torch.zeros((), dtype=torch.uint8)}),
         UnexpectedQuantComponent, r"unexpected keys \['m\.SCB\.weight_format'\]"),
        (lambda t: t.update({"m.weight_format.x": torch.zeros(1)}), UnexpectedQuantComponent,
         r"unexpected keys \['m\.weight_format\.x'\]"),
    ],
)  # fmt: skip
def test_bad_int8_groups_name_the_tensor(tmp_path: Path, edit, error, fragment: str) -> None:
    tensors = _bnb_keys("m")
    edit(tensors)
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    with pytest.raises(error, match=fragment) as info:
        open_checkpoint([tmp_path / "x.safetensors"]).records()
    assert str(tmp_path) in str(info.value)  # the shard, or the folder for a group joined across shards


def test_weight_format_is_optional_and_groups_split_across_shards_join(tmp_path: Path) -> None:
    t = _bnb_keys("m")
    save_file({"m.SCB": t["m.SCB"]}, tmp_path / "a.safetensors", metadata={"format": "pt"})
    save_file({"m.weight": t["m.weight"]}, tmp_path / "b.safetensors", metadata={"format": "pt"})
    ckpt = open_checkpoint([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    rec = ckpt.records()["m.weight"]
    assert isinstance(rec, Int8Tensor)
    assert not rec.has_weight_format
    assert torch.equal(rec.scb, t["m.SCB"])


def test_unexpected_key_under_a_split_int8_group_is_refused(tmp_path: Path) -> None:
    """A bnb checkpoint cut key by key: the SCB in one shard, the weight and a stray key under it in
    the next; the group joined across shards is refused like a whole one."""
    t = _bnb_keys("m")
    save_file({"m.SCB": t["m.SCB"]}, tmp_path / "a.safetensors", metadata={"format": "pt"})
    save_file(
        {"m.weight": t["m.weight"], "m.weight.absmax": torch.ones(6)},
        tmp_path / "b.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(UnexpectedQuantComponent, match=r"unexpected keys \['m\.weight\.absmax'\]"):
        open_checkpoint([tmp_path / "a.safetensors", tmp_path / "b.safetensors"]).records()


def test_quantization_config_has_transformers_13_keys() -> None:
    qc = quantization_config(threshold=0.0, skip_modules=None)
    assert len(qc) == 13
    assert (qc["load_in_8bit"], qc["_load_in_8bit"], qc["load_in_4bit"]) == (True, True, False)
    assert qc["llm_int8_threshold"] == 0.0
    assert qc["llm_int8_skip_modules"] is None
    import transformers

    assert qc == transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0).to_dict()


def test_weight_format_in_the_next_shard_joins_its_group(tmp_path: Path) -> None:
    """transformers cuts shards key by key (weight, bias, SCB, weight_format): the last key may land in
    the next shard; the checkpoint reader joins it instead of listing it as a stray tensor."""
    t = _bnb_keys("m")
    first = {k: v for k, v in t.items() if not k.endswith("weight_format")}
    save_file(first, tmp_path / "a.safetensors", metadata={"format": "pt"})
    save_file(
        {"m.weight_format": t["m.weight_format"]}, tmp_path / "b.safetensors", metadata={"format": "pt"}
    )
    records = open_checkpoint([tmp_path / "a.safetensors", tmp_path / "b.safetensors"]).records()
    assert sorted(records) == ["m.bias", "m.weight"]
    assert isinstance(records["m.weight"], Int8Tensor)
    assert records["m.weight"].has_weight_format


def test_missing_scb_in_a_split_checkpoint_is_refused(tmp_path: Path) -> None:
    """An int8 weight whose SCB is in no shard must not load as a plain (float) weight."""
    t = _bnb_keys("m")
    save_file({"m.weight": t["m.weight"]}, tmp_path / "a.safetensors", metadata={"format": "pt"})
    save_file(
        {"m.weight_format": t["m.weight_format"]}, tmp_path / "b.safetensors", metadata={"format": "pt"}
    )
    with pytest.raises(MissingQuantComponent, match=r"no 'm\.SCB'"):
        open_checkpoint([tmp_path / "a.safetensors", tmp_path / "b.safetensors"]).records()
