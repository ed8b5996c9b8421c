"""One quantized weight as a record, and its bitsandbytes state-dict keys.

The keys are exactly what bnb's ``Linear4bit._save_to_state_dict`` / ``QuantState.as_dict(packed=True)``
write for a weight ``W`` (e.g. ``model.layers.0.mlp.down_proj.weight``)::

    W                                   packed codes   quant_storage dtype [(n+1)//2 // itemsize, 1]
    W.absmax                            U8 [nb] (nested codes) | F32 [nb]
    W.quant_map                         F32 [16]
    W.nested_absmax                     F32 [ceil(nb/256)]        nested only
    W.nested_quant_map                  F32 [256]                 nested only
    W.quant_state.bitsandbytes__nf4     U8 [len] JSON              (or __fp4)

Nothing else may sit under ``W.``: transformers passes every such key to ``QuantState.from_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from formats import codebooks, reference
from formats.bnb_compat import quant_state_json, quant_state_key
from formats.quant_types import QuantType, n_blocks
from formats.validate import (
    STORAGE_CODES,
    BadQuantState,
    MissingQuantComponent,
    QuantLayoutMismatch,
    QuantStateInfo,
    UnexpectedQuantComponent,
    check_quant_group,
    check_quant_options,
    parse_quant_state,
    quant_layout,
)
from formats.writer import DTYPE_CODES, TORCH_DTYPES, TensorSlot

_RECORD = "<record>"  # the "file" named in errors raised for in-memory records


@dataclass(frozen=True)
class NestedAbsmax:
    """Nested (double) quantization of the absmax: the record's ``absmax`` then holds uint8 codes."""

    nested_absmax: torch.Tensor  # float32 [ceil(nb/256)]: max |absmax - offset| per 256 absmax values
    nested_quant_map: torch.Tensor  # float32 [256]: the stored dynamic map (use it, never a constant)
    offset: float  # a float32 value: absmax = nested_quant_map[code] * nested_absmax + offset


@dataclass(frozen=True)
class QuantizedTensor:
    name: str  # the weight key, e.g. "model.layers.0.mlp.down_proj.weight"
    shape: tuple[int, ...]  # original shape ([out, in] for a Linear)
    dtype: str  # "float32" | "float16" | "bfloat16": original dtype = dequantized dtype
    quant_type: QuantType
    blocksize: int
    packed: torch.Tensor  # codes, 2 per byte, first element in the high nibble; [bytes // itemsize, 1]
    absmax: torch.Tensor  # nested: uint8 [nb]; else float32 [nb]
    quant_map: torch.Tensor  # float32 [16]: the stored 4-bit table
    nested: NestedAbsmax | None = None
    quant_storage: str = "uint8"  # dtype the packed bytes are viewed as (same bytes)
    # Set by from_checked_group: the keys, dtypes, shapes and quant state were checked against the shard
    # header already (and dataclasses.replace with moved tensors keeps it); checking 18 k expert
    # records a second time was a second of a MoE load.
    prechecked: bool = field(default=False, repr=False, compare=False, kw_only=True)

    def __post_init__(self) -> None:
        shape = tuple(int(d) for d in self.shape)
        object.__setattr__(self, "shape", shape)
        if not self.prechecked:
            check_quant_options(_RECORD, self.name, shape, self.dtype, self.blocksize, self.quant_storage)
        packed = self.packed
        storage = TORCH_DTYPES[STORAGE_CODES[self.quant_storage]]
        if packed.dtype == torch.uint8 and storage != torch.uint8:
            packed = packed.reshape(-1).view(storage)
        if packed.dtype == storage:
            packed = packed.reshape(-1, 1)
        object.__setattr__(self, "packed", packed)
        if self.prechecked:
            return
        if self.nested is not None:
            offset = float(np.float32(self.nested.offset))
            if offset != self.nested.offset and not math.isnan(offset):
                msg = (
                    f"{_RECORD}: tensor {self.name!r}: nested offset {self.nested.offset!r} "
                    "is not a float32 value"
                )
                raise QuantLayoutMismatch(msg)
        present = {
            k: (DTYPE_CODES.get(v.dtype, str(v.dtype)), tuple(v.shape)) for k, v in self.state_dict().items()
        }
        check_quant_group(_RECORD, self.name, self._info(), present)

    # ---------------------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return n_blocks(self.n, self.blocksize)

    @property
    def quant_state_key(self) -> str:
        return quant_state_key(self.name, self.quant_type)

    def _info(self) -> QuantStateInfo:
        offset = None if self.nested is None else float(np.float32(self.nested.offset))
        return QuantStateInfo(self.quant_type, self.blocksize, self.dtype, self.shape, offset)

    def quant_state_json(self) -> bytes:
        offset = None if self.nested is None else self.nested.offset
        return quant_state_json(self.quant_type, self.blocksize, self.dtype, self.shape, offset)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The bnb keys and tensors, in the order bnb's ``_save_to_state_dict`` produces them."""
        out = {
            self.name: self.packed,
            f"{self.name}.absmax": self.absmax,
            f"{self.name}.quant_map": self.quant_map,
        }
        if self.nested is not None:
            out[f"{self.name}.nested_absmax"] = self.nested.nested_absmax
            out[f"{self.name}.nested_quant_map"] = self.nested.nested_quant_map
        js = self.quant_state_json()
        out[self.quant_state_key] = torch.frombuffer(bytearray(js), dtype=torch.uint8)
        return out

    def packed_bytes(self) -> torch.Tensor:
        """The packed codes as a flat uint8 tensor [(n+1)//2] (a view)."""
        return self.packed.reshape(-1).view(torch.uint8)

    def absmax_f32(self) -> np.ndarray:
        """The float32 absmax per block; nested codes decoded with the stored map (design.md rule)."""
        if self.nested is None:
            return self.absmax.numpy().astype(np.float32, copy=False)
        return reference.dequantize_nested(
            self.absmax.numpy(),
            self.nested.nested_absmax.numpy(),
            self.nested.offset,
            self.nested.nested_quant_map.numpy(),
        )

    def dequantize(self) -> torch.Tensor:
        """Reference (numpy) dequantization to the original dtype and shape. Slow; for tests and tools."""
        w = reference.dequantize_4bit(
            self.packed_bytes().numpy(), self.absmax_f32(), self.n, self.blocksize, self.quant_map.numpy()
        )
        if self.dtype == "bfloat16":
            out = torch.from_numpy(reference.f32_to_bf16_bits(w).view(np.int16)).view(torch.bfloat16)
        else:
            out = torch.from_numpy(w).to(getattr(torch, self.dtype))
        return out.reshape(self.shape)

    # ---------------------------------------------------------------------------------------------
    @classmethod
    def plan_slots(
        cls,
        name: str,
        shape: tuple[int, ...],
        dtype: str,
        quant_type: QuantType,
        blocksize: int,
        nested: bool,
        quant_storage: str = "uint8",
    ) -> list[TensorSlot]:
        """The writer slots of a record, known before quantizing (the JSON is a variable-length slot)."""
        shape = tuple(int(d) for d in shape)
        check_quant_options(_RECORD, name, shape, dtype, blocksize, quant_storage)
        layout = quant_layout(name, shape, quant_type, blocksize, nested, quant_storage)
        return [TensorSlot(key, code, shp) for key, (code, shp) in layout.items()]

    @classmethod
    def from_kernel_outputs(
        cls,
        name: str,
        shape: tuple[int, ...],
        dtype: str,
        quant_type: QuantType,
        blocksize: int,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        nested: tuple[torch.Tensor, torch.Tensor, float] | None = None,
        quant_storage: str = "uint8",
    ) -> QuantizedTensor:
        """A record from ``quantize_4bit`` (+ ``quantize_nested``) outputs, with our code tables.

        ``nested`` is (codes uint8 [nb], nested_absmax float32, offset) from ``quantize_nested``. The code
        tables are made on the outputs' device (a CUDA record's kernels read them there).
        """
        quant_map = torch.tensor(quant_type.codebook, dtype=torch.float32, device=absmax.device)
        if nested is None:
            return cls(
                name, shape, dtype, quant_type, blocksize, packed, absmax, quant_map, None, quant_storage
            )
        codes, nested_absmax, offset = nested
        dynamic8 = torch.tensor(codebooks.DYNAMIC8, dtype=torch.float32, device=nested_absmax.device)
        state2 = NestedAbsmax(nested_absmax, dynamic8, offset)
        return cls(name, shape, dtype, quant_type, blocksize, packed, codes, quant_map, state2, quant_storage)

    @classmethod
    def from_state_dict(
        cls, name: str, tensors: Mapping[str, torch.Tensor], *, file: str = "<state dict>"
    ) -> QuantizedTensor:
        """Rebuild a record from bnb keys (ours or a bnb/transformers-made checkpoint).

        ``tensors`` may hold other keys; only ``name`` and ``name + ".*"`` are read. The stored maps
        are used as they are (bnb <= 0.49 CPU wrote -1.0 at nested_quant_map[0]).
        """
        qs_keys = [f"{name}.quant_state.bitsandbytes__{qt.label}" for qt in QuantType]
        found = [k for k in qs_keys if k in tensors]
        if not found:
            msg = (
                f"{file}: tensor {name!r}: no '{name}.quant_state.bitsandbytes__nf4|fp4' key; "
                "not a bnb 4-bit weight"
            )
            raise MissingQuantComponent(msg)
        if len(found) > 1:
            msg = f"{file}: tensor {name!r}: both nf4 and fp4 quant states present"
            raise UnexpectedQuantComponent(msg)
        js = tensors[found[0]]
        if js.dtype != torch.uint8 or js.dim() != 1:
            msg = (
                f"{file}: tensor {found[0]!r}: quant state must be a 1-D uint8 tensor, "
                f"got {js.dtype} {list(js.shape)}"
            )
            raise BadQuantState(msg)
        info = parse_quant_state(file, found[0], js.numpy().tobytes())
        if name not in tensors:
            msg = f"{file}: tensor {name!r}: packed weight missing (its quant state {found[0]!r} is present)"
            raise MissingQuantComponent(msg)
        present = {
            k: (DTYPE_CODES.get(v.dtype, str(v.dtype)), tuple(v.shape))
            for k, v in tensors.items()
            if k == name or k.startswith(name + ".")
        }
        storage, _ = check_quant_group(file, name, info, present)
        return cls.from_checked_group(name, info, storage, tensors)

    @classmethod
    def from_checked_group(
        cls, name: str, info: QuantStateInfo, storage: str, tensors: Mapping[str, torch.Tensor]
    ) -> QuantizedTensor:
        """The record of a group whose quant state and keys were already parsed and checked against
        ``info`` (``formats.validate.find_quant_groups``, as every shard opened by ``formats.reader``):
        the quant-state JSON is not parsed a second time."""
        nested = None
        if info.nested_offset is not None:
            nested = NestedAbsmax(
                tensors[f"{name}.nested_absmax"], tensors[f"{name}.nested_quant_map"], info.nested_offset
            )
        return cls(
            name,
            info.shape,
            info.dtype,
            info.quant_type,
            info.blocksize,
            tensors[name],
            tensors[f"{name}.absmax"],
            tensors[f"{name}.quant_map"],
            nested,
            storage,
            prechecked=True,
        )
