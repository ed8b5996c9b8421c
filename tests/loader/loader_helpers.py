"""Shared builders for the loader tests: quantized layers and tiny checkpoints (ours and bnb-made)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from converter import kernels
from converter.loader.module import Linear4bit
from formats.quant_types import QuantType
from formats.record import QuantizedTensor

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

TINY_LLAMA = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}


def quantize_record(
    w: torch.Tensor,
    *,
    blocksize: int = 64,
    quant_type: str = "nf4",
    nested: bool = True,
    storage: str = "uint8",
    name: str = "layer.weight",
) -> QuantizedTensor:
    """A record of ``w`` made by our kernels (the same bytes as formats.reference)."""
    qt = QuantType.parse(quant_type)
    packed, absmax = kernels.quantize_4bit(w.contiguous(), blocksize=blocksize, quant_type=qt)
    nested_out = kernels.quantize_nested(absmax) if nested else None
    return QuantizedTensor.from_kernel_outputs(
        name, tuple(w.shape), DTYPE_NAMES[w.dtype], qt, blocksize, packed, absmax, nested=nested_out,
        quant_storage=storage,
    )  # fmt: skip


def make_layer(
    out_features: int,
    in_features: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    bias: bool = False,
    seed: int = 0,
    compute_dtype: torch.dtype | None = None,
    **kw,
) -> tuple[Linear4bit, QuantizedTensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_features, in_features, generator=g) * 0.05).to(dtype)
    record = quantize_record(w, **kw)
    b = (torch.randn(out_features, generator=g) * 0.1).to(dtype) if bias else None
    return Linear4bit.from_record(record, bias=b, compute_dtype=compute_dtype), record, b


def save_tiny_llama(folder: Path, seed: int = 0, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides})).to(torch.bfloat16)
    model.save_pretrained(folder)
    return folder


def bnb_quantize_folder(
    src: Path,
    dst: Path,
    *,
    quant_type: str = "nf4",
    nested: bool = True,
    storage: torch.dtype = torch.uint8,
    skip: list[str] | None = None,
) -> Path:
    """transformers + bitsandbytes on CPU: quantize on load, then save_pretrained (the bnb-made oracle)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=nested,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=storage,
        llm_int8_skip_modules=skip,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(src, quantization_config=config, device_map="cpu")
        model.save_pretrained(dst)
    return dst


def bnb_load(folder: Path):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")


def matmul_bound(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Elementwise bound for a matmul whose result is rounded to ``dtype``: eps(dtype) * (|x| @ |W|.T).

    Covers the final rounding (half an ulp of |y| <= |x|@|W|) plus float32 accumulation in any order.
    """
    eps = torch.finfo(dtype).eps
    return eps * (x.float().abs() @ w.float().abs().T) + 1e-6


def reference_weight(record: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """The numpy reference decode in float32, then one round-to-nearest-even cast to ``dtype``."""
    from formats import reference

    w = reference.dequantize_4bit(
        record.packed_bytes().numpy(),
        record.absmax_f32(),
        record.n,
        record.blocksize,
        record.quant_map.numpy(),
    )
    return torch.from_numpy(w).reshape(record.shape).to(dtype)


def assert_compiled_without_breaks(counters) -> None:
    """dynamo really compiled (TORCHDYNAMO_DISABLE would make torch.compile a no-op) and broke no graph."""
    assert counters["stats"]["unique_graphs"] >= 1, "dynamo compiled nothing: is it disabled?"
    assert dict(counters["graph_break"]) == {}
