"""The on-disk format of quantize-model: codebooks, quant types, the quantized-tensor record,
shard reader/writer, index and transformers/bitsandbytes compatibility. No CLI, no network.

The names below are the public face; see docs/format.md for the specification.
"""

from formats.bnb_compat import quant_state_json, quantization_config, update_config
from formats.index import INDEX_NAME, Index, read_index, shard_name, verify_shards, write_index
from formats.metadata import (
    build_metadata,
    passthrough_record,
    provenance,
    quantized_record,
    validate_metadata,
)
from formats.quant_types import QuantType
from formats.reader import Checkpoint, Shard, open_checkpoint, open_folder, open_shard
from formats.record import NestedAbsmax, QuantizedTensor
from formats.validate import FORMAT_VERSION, FormatError
from formats.writer import ShardInfo, ShardWriter, TensorSlot

__all__ = [
    "FORMAT_VERSION",
    "INDEX_NAME",
    "Checkpoint",
    "FormatError",
    "Index",
    "NestedAbsmax",
    "QuantType",
    "QuantizedTensor",
    "Shard",
    "ShardInfo",
    "ShardWriter",
    "TensorSlot",
    "build_metadata",
    "open_checkpoint",
    "open_folder",
    "open_shard",
    "passthrough_record",
    "provenance",
    "quant_state_json",
    "quantization_config",
    "quantized_record",
    "read_index",
    "shard_name",
    "update_config",
    "validate_metadata",
    "verify_shards",
    "write_index",
]
