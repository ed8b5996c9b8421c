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


#: make_interleaved's tensors in on-disk order, per file: (name, shape, dtype, quantized?). Kept tensors
#: sit between quantized ones, sizes are odd (packed tails, partial blocks), dtypes mixed.
INTERLEAVED = {
    "a.safetensors": [
        ("l0.bias", (64,), torch.bfloat16, False),
        ("l0.weight", (64, 64), torch.bfloat16, True),
        ("l1.weight", (33, 65), torch.bfloat16, True),  # 2145 elements: odd, a partial last block
        ("l2.norm", (64,), torch.bfloat16, False),
        ("l3.weight", (64, 128), torch.float32, True),
        ("l4.weight", (16, 64), torch.bfloat16, False),  # 2-D but not matched by the include globs
        ("l5.weight", (96, 64), torch.float16, True),
    ],
    "b.safetensors": [
        ("l6.weight", (128, 64), torch.bfloat16, True),
        ("l7.bias", (128,), torch.bfloat16, False),
        ("l8.weight", (7, 9), torch.float16, True),  # 63 elements: one partial block, odd
        ("l9.weight", (40, 64), torch.bfloat16, True),
    ],
}
#: --include globs that select exactly the tensors marked quantized above (the checkpoint has no config).
INTERLEAVED_INCLUDE = ("l0", "l1", "l3", "l5", "l6", "l8", "l9")


def make_interleaved(path: Path, *, seed: int = 0, nan_in: str | None = None) -> Path:
    """Two safetensors files written tensor by tensor in INTERLEAVED's order (save_file would sort
    them), with an index and no config.json; ``nan_in`` puts one NaN into that tensor."""
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    codes = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
    weight_map = {}
    for file, entries in INTERLEAVED.items():
        header: dict = {"__metadata__": {"format": "pt"}}
        blobs = []
        offset = 0
        for name, shape, dtype, _ in entries:
            t = torch.randn(shape, generator=gen).to(dtype)
            if name == nan_in:
                t.view(-1)[t.numel() // 2] = float("nan")
            raw = t.view(torch.uint8).numpy().tobytes()
            header[name] = {
                "dtype": codes[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + len(raw)],
            }
            offset += len(raw)
            blobs.append(raw)
            weight_map[name] = file
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        with (path / file).open("wb") as f:
            f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path
