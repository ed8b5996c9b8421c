"""Load pre-quantized checkpoints into PyTorch: state dicts, 4-bit and LLM.int8
linear layers, whole models.

``load_quantized_state`` needs only torch and safetensors; ``replace_linear_layers`` works on any
``nn.Module``; ``load_quantized`` builds a transformers model (imported lazily, only there).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "Linear4bit",
    "Linear8bit",
    "QuantLinear4bit",
    "QuantLinear8bit",
    "compile_options",
    "dequantize_checkpoint",
    "dequantize_model",
    "graphed_greedy",
    "load_quantized",
    "load_quantized_state",
    "register_lora",
    "replace_linear_layers",
]

_LAZY = {
    "Linear4bit": "converter.loader.module",
    "QuantLinear4bit": "converter.loader.module",
    "Linear8bit": "converter.loader.module_int8",
    "QuantLinear8bit": "converter.loader.module_int8",
    "register_lora": "converter.loader.lora",
    "load_quantized_state": "converter.loader.state",
    "replace_linear_layers": "converter.loader.replace",
    "load_quantized": "converter.loader.model",
    "dequantize_checkpoint": "converter.loader.dequantize",
    "dequantize_model": "converter.loader.dequantize_inplace",
    "graphed_greedy": "converter.loader.decode",
    "compile_options": "converter.loader.compile_guards",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    msg = f"module 'converter.loader' has no attribute {name!r}"
    raise AttributeError(msg)
