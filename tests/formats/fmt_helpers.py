"""Shared helpers for the formats tests: records from the numpy reference and from bitsandbytes."""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from formats import reference
from formats.metadata import (
    build_metadata,
    passthrough_record,
    provenance,
    quantized_record,
    validate_metadata,
)
from formats.quant_types import QuantType
from formats.record import QuantizedTensor
from formats.writer import DTYPE_CODES, TensorSlot

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def reference_record(
    name: str,
    x: torch.Tensor,
    quant_type: QuantType = QuantType.NF4,
    blocksize: int = 64,
    nested: bool = True,
    quant_storage: str = "uint8",
) -> QuantizedTensor:
    """Quantize ``x`` with formats.reference and wrap the outputs in a record."""
    flat = x.detach().float().reshape(-1).numpy()
    packed, absmax = reference.quantize_4bit(flat, blocksize, quant_type)
    nest = None
    if nested:
        codes, nested_absmax, offset = reference.quantize_nested(absmax)
        nest = (torch.from_numpy(codes), torch.from_numpy(nested_absmax), float(offset))
    dtype = str(x.dtype).removeprefix("torch.")
    return QuantizedTensor.from_kernel_outputs(
        name, tuple(x.shape), dtype, quant_type, blocksize,
        torch.from_numpy(packed), torch.from_numpy(absmax), nest, quant_storage,
    )  # fmt: skip


def bnb_state_dict(name: str, x: torch.Tensor, quant_type: str, nested: bool, **kw: object) -> dict:
    """bitsandbytes' own serialized keys for ``x`` (as Linear4bit._save_to_state_dict writes them)."""
    import bitsandbytes.functional as bnbf

    q, state = bnbf.quantize_4bit(x, blocksize=64, compress_statistics=nested, quant_type=quant_type, **kw)
    return {name: q, **{f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()}}


def shard_plan(
    records: list[QuantizedTensor], passthrough: dict[str, torch.Tensor]
) -> tuple[list[TensorSlot], dict[str, str]]:
    """Slots and schema-valid metadata for a shard holding ``records`` and ``passthrough`` tensors."""
    slots: list[TensorSlot] = []
    tensors: dict[str, dict] = {}
    for r in records:
        slots += QuantizedTensor.plan_slots(
            r.name, r.shape, r.dtype, r.quant_type, r.blocksize, r.nested is not None, r.quant_storage
        )
        tensors[r.name] = quantized_record(
            shape=r.shape, dtype=r.dtype, quant_type=r.quant_type, blocksize=r.blocksize,
            nested=r.nested is not None, quant_storage=r.quant_storage,
        )  # fmt: skip
    for k, t in passthrough.items():
        slots.append(TensorSlot(k, DTYPE_CODES[t.dtype], tuple(t.shape)))
        tensors[k] = passthrough_record(
            dtype=DTYPE_CODES[t.dtype], shape=t.shape, reason="not a Linear weight"
        )
    options = {"quant_type": "nf4", "blocksize": 64, "double_quant": True, "quant_storage": "uint8"}
    prov = provenance(source="test", files=[("model.safetensors", "0" * 64)], options=options)
    metadata = build_metadata(tensors, prov, version="0.1.0")
    validate_metadata({"format": "pt", **metadata})  # every shard the tests write matches the schema
    return slots, metadata


def all_tensors(
    records: list[QuantizedTensor], passthrough: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for r in records:
        out.update(r.state_dict())
    out.update(passthrough)
    return out


def randn(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(math.prod(shape), generator=g).reshape(shape).to(dtype)


def as_bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()
