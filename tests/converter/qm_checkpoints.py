"""Small generated checkpoints for converter and CLI tests (imported by both conftest files)."""

from __future__ import annotations

import json
import struct
import sys
import types
from pathlib import Path

import numpy as np
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


def install_reference_kernels() -> None:
    """Until converter.kernels (the C++ extension's face) is importable, tests run on formats.reference.

    Test-only: product code never falls back. Installs a ``converter.kernels`` module in sys.modules
    implementing the documented interface with the numpy reference.
    """
    try:
        import converter.kernels
    except ImportError:
        pass
    else:
        return
    from formats import reference
    from formats.quant_types import QuantType

    mod = types.ModuleType("converter.kernels")

    class NonFiniteInputError(ValueError):
        pass

    def quantize_4bit(x, *, blocksize, quant_type: QuantType, isa="auto", threads=None):
        a = x.detach().to("cpu", torch.float32).contiguous().numpy().ravel()
        if not np.isfinite(a).all():
            msg = "input holds NaN or Inf"
            raise NonFiniteInputError(msg)
        packed, absmax = reference.quantize_4bit(a, blocksize, quant_type)
        return torch.from_numpy(packed.copy()), torch.from_numpy(absmax.copy())

    def quantize_nested(absmax, *, threads=None):
        codes, na, off = reference.quantize_nested(absmax.numpy())
        return torch.from_numpy(codes.copy()), torch.from_numpy(na.copy()), float(off)

    def dequantize_4bit(packed, absmax, *, n, blocksize, quant_map, out_dtype):
        w = reference.dequantize_4bit(packed.numpy(), absmax.numpy(), n, blocksize, quant_map.numpy())
        return torch.from_numpy(w).to(out_dtype)

    def dequantize_nested(codes, nested_absmax, offset, nested_map):
        return torch.from_numpy(
            reference.dequantize_nested(codes.numpy(), nested_absmax.numpy(), offset, nested_map.numpy())
        )

    mod.NonFiniteInputError = NonFiniteInputError
    mod.quantize_4bit = quantize_4bit
    mod.quantize_nested = quantize_nested
    mod.dequantize_4bit = dequantize_4bit
    mod.dequantize_nested = dequantize_nested
    mod.available_backends = lambda: {"cpu": {"isa": ["numpy-reference"], "threads": 1}}
    mod.REFERENCE_FALLBACK = True
    sys.modules["converter.kernels"] = mod
    import converter

    converter.kernels = mod  # type: ignore[attr-defined]
