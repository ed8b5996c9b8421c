"""Small generated checkpoints for converter and CLI tests (imported by both conftest files)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch


def make_tiny_llama(
    path: Path,
    *,
    max_shard_size: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
) -> Path:
    """A random LlamaForCausalLM saved by transformers' save_pretrained (tokenizer-less)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 128}\n')
    (path / "LICENSE").write_text("Apache-2.0 (test fixture)\n")
    return path


def write_safetensors_header(path: Path, header: dict, data_size: int) -> None:
    """A safetensors file with ``header`` and ``data_size`` bytes of data as a sparse hole (no disk use)."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + data_size)
