"""The on-disk format of quantize-model: codebooks, quant types, the quantized-tensor record,
shard reader/writer, index and transformers/bitsandbytes compatibility. No CLI, no network.

The names below are the public face; see docs/format.md for the specification. They are imported
lazily (PEP 562), so ``import formats.quant_types`` (the CLI's option parsing) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    "quant_state_json": "bnb_compat",
    "quantization_config": "bnb_compat",
    "update_config": "bnb_compat",
    "INDEX_NAME": "index",
    "Index": "index",
    "read_index": "index",
    "shard_name": "index",
    "verify_shards": "index",
    "write_index": "index",
    "build_metadata": "metadata",
    "passthrough_record": "metadata",
    "provenance": "metadata",
    "quantized_record": "metadata",
    "validate_metadata": "metadata",
    "QuantType": "quant_types",
    "Checkpoint": "reader",
    "Shard": "reader",
    "open_checkpoint": "reader",
    "open_folder": "reader",
    "open_shard": "reader",
    "NestedAbsmax": "record",
    "QuantizedTensor": "record",
    "FORMAT_VERSION": "validate",
    "FormatError": "validate",
    "ShardInfo": "writer",
    "ShardWriter": "writer",
    "TensorSlot": "writer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        msg = f"module 'formats' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(f"formats.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
