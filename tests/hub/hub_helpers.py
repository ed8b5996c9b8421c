"""Helpers shared by the fake-Hub tests and the benchmark (a module of its own: a test module doing
``from conftest import ...`` would get whichever conftest.py was imported first in a full run)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from fake_hub import FakeHub

TOKEN = "hf_test_token"


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder``, by its relative path."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def hub_env(hub: FakeHub, home: Path, *, offline: bool = False) -> dict[str, str]:
    """Environment for a subprocess talking to ``hub`` with its own HF_HOME."""
    env = dict(os.environ)
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HF_XET_CACHE"):
        env.pop(k, None)
    env.update(
        HF_ENDPOINT=hub.endpoint,
        HF_HOME=str(home),
        HF_HUB_OFFLINE="1" if offline else "0",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_ETAG_TIMEOUT="5",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TORCHDYNAMO_DISABLE="1",
    )
    return env


def make_checkpoint(path: Path, *, shards: int = 3, seed: int = 0, hidden: int = 64) -> Path:
    """A tiny Llama-shaped bf16 checkpoint with ``shards`` files, config, tokenizer and licence files,
    plus files the converter must never fetch (original/*.pth, consolidated.*, a .bin duplicate)."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    layers = max(1, shards - 1)
    tensors: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    vocab = 256
    tensors[0]["model.embed_tokens.weight"] = torch.randn(vocab, hidden, generator=g).bfloat16()
    for i in range(layers):
        t = tensors[min(i, shards - 1)]
        p = f"model.layers.{i}."
        for n, shape in (
            ("self_attn.q_proj", (hidden, hidden)),
            ("self_attn.k_proj", (hidden // 2, hidden)),
            ("self_attn.v_proj", (hidden // 2, hidden)),
            ("self_attn.o_proj", (hidden, hidden)),
            ("mlp.gate_proj", (2 * hidden, hidden)),
            ("mlp.up_proj", (2 * hidden, hidden)),
            ("mlp.down_proj", (hidden, 2 * hidden)),
        ):
            t[p + n + ".weight"] = (torch.randn(*shape, generator=g) * 0.05).bfloat16()
        t[p + "input_layernorm.weight"] = torch.ones(hidden).bfloat16()
        t[p + "post_attention_layernorm.weight"] = torch.ones(hidden).bfloat16()
    tensors[-1]["model.norm.weight"] = torch.ones(hidden).bfloat16()
    tensors[-1]["lm_head.weight"] = torch.randn(vocab, hidden, generator=g).bfloat16()
    weight_map = {}
    if shards == 1:
        save_file(tensors[0], str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        for k, t in enumerate(tensors):
            name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_file(t, str(path / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(t, name))
        index = {"metadata": {"total_size": 0}, "weight_map": dict(sorted(weight_map.items()))}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text('{"do_sample": false}\n')
    (path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}\n')
    (path / "tokenizer_config.json").write_text('{"model_max_length": 128}\n')
    (path / "LICENSE").write_text("Apache License 2.0 (test fixture)\n")
    (path / "README.md").write_text("---\nlicense: apache-2.0\npipeline_tag: text-generation\n---\n# tiny\n")
    (path / "original").mkdir(exist_ok=True)
    (path / "original" / "consolidated.00.pth").write_bytes(b"\0" * 4096)
    (path / "consolidated.safetensors.bak").write_bytes(b"\0" * 16)
    (path / "pytorch_model.bin").write_bytes(b"\0" * 4096)
    return path


def qm(*args: str | Path):
    """The CLI in this process (talking to the fake Hub the fixtures set up); crashes fail the test."""
    from click.testing import CliRunner

    from converter.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
