"""bitsandbytes' LLM.int8 (8-bit) format: the reference math in numpy, the state-dict keys and the record.

A quantized ``Linear8bitLt`` ``<m>`` is stored as (bitsandbytes 0.50 ``_save_to_state_dict``)::

    <m>.weight          I8  [out, in]   row-major codes in [-127, 127] (GPT-2 Conv1D transposed first)
    <m>.SCB             F32 [out]       row absmax of the fp16-cast weight (an fp16 value, widened)
    <m>.weight_format   U8  []          0 = "row" (bnb >= 0.45 writes nothing else; transformers ignores it)

The bias stays ``<m>.bias`` in the model dtype. Note that SCB and weight_format sit under the MODULE,
not under the weight key as the 4-bit components do.

Quantizer (bnb ``int8_vectorwise_quant`` on CPU, verified to 0 differing bytes of 24M): per row,
``h = fp16(x)`` (round to nearest even), ``SCB = max|h|``, ``s = f32(f32(1/SCB) * 127)`` (torch's
``127.0 / t`` is ``t.reciprocal() * 127``: two roundings), ``q = round_half_even(f32(h * s))`` with a
NaN product giving 0 (a zero row, and a row with a value past fp16's range: SCB = +inf). On CUDA bnb
uses ``s = __fdividef(127, SCB)``, 1 ulp off for 3,996 of the 31,745 fp16 values (the table in
``data/fdividef_scale_exceptions.tsv``, measured on an H200); ``cuda_scale_table`` reproduces it.
Dequantization: ``W = f32(f32(q * SCB) * f32(1/127))``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from formats.validate import (
    INT8_QUANT_TYPE,
    WEIGHT_DTYPES,
    WEIGHT_FORMAT_ROW,
    Int8Info,
    QuantLayoutMismatch,
    UnsupportedOption,
    check_int8_group,
    int8_layout,
    scb_key,
    weight_format_key,
)

if TYPE_CHECKING:  # torch is imported where a record's tensors are made: the converter's path needs none
    import torch

QUANT_TYPE = INT8_QUANT_TYPE
__all__ = [
    "Int8Info",
    "Int8Tensor",
    "cuda_scale_table",
    "dequantize_int8",
    "int8_layout",
    "quantization_config",
    "quantize_int8",
    "row_scales",
    "scb_key",
    "weight_format_key",
]

#: f32(1/127) as bnb's int8_vectorwise_dequant multiplies by it (0x3C010204).
INV127 = np.frombuffer(np.uint32(0x3C010204).tobytes(), dtype=np.float32)[0]
#: The row scales a checkpoint can be made with: bnb's CPU formula or its CUDA __fdividef.
SCALES = ("cpu", "cuda")
DEFAULT_THRESHOLD = 6.0
TABLE_PATH = Path(__file__).with_name("data") / "fdividef_scale_exceptions.tsv"
#: One table entry per non-negative finite fp16 bit pattern (0x0000..0x7c00).
TABLE_SIZE = 0x7C01


# --------------------------------------------------------------------------------------------------
# Reference math (numpy; the test oracle of the C++ / CUDA kernels)


def _cpu_scale(scb: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return (np.float32(1.0) / scb.astype(np.float32)).astype(np.float32) * np.float32(127.0)


@cache
def _exceptions() -> dict[int, tuple[int, int]]:
    """fp16 bits of SCB -> (CPU scale bits, CUDA scale bits) where the two differ."""
    out: dict[int, tuple[int, int]] = {}
    for line in TABLE_PATH.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        h, cpu, gpu = (int(v, 16) for v in line.split("\t"))
        out[h] = (cpu, gpu)
    return out


@cache
def cuda_scale_table() -> np.ndarray:
    """float32 [0x7c01]: bnb's CUDA row scale ``__fdividef(127, SCB)`` by the fp16 bits of SCB.

    The CPU scale with the measured exceptions substituted (bnb-int8.md §4). Read-only.
    """
    scb = np.arange(TABLE_SIZE, dtype=np.uint16).view(np.float16).astype(np.float32)
    table = _cpu_scale(scb)
    bits = table.view(np.uint32)
    for h, (cpu, gpu) in _exceptions().items():
        if bits[h] != cpu:
            msg = f"{TABLE_PATH}: fp16 0x{h:04x}: CPU scale 0x{bits[h]:08x} here, 0x{cpu:08x} in the table"
            raise ValueError(msg)
        bits[h] = gpu
    table.setflags(write=False)
    return table


def row_scales(scb: np.ndarray, scale: str = "cpu") -> np.ndarray:
    """The per-row scale ``s`` for float32 SCB values (fp16 values) under ``scale``."""
    if scale not in SCALES:
        msg = f"unknown int8 scale {scale!r}: expected one of {list(SCALES)}"
        raise ValueError(msg)
    scb = np.asarray(scb, dtype=np.float32)
    if scale == "cpu":
        return _cpu_scale(scb)
    idx = np.minimum(scb.astype(np.float16).view(np.uint16), TABLE_SIZE - 1)
    return cuda_scale_table()[idx]


def quantize_int8(x: np.ndarray, scale: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Reference quantizer: x float [rows, cols] (the load-dtype values as float32) -> (codes i8, SCB f32)."""
    with np.errstate(over="ignore"):  # past fp16 range: inf, as torch casts
        h = np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)
    scb = np.abs(h).max(axis=1).astype(np.float32) if h.shape[1] else np.zeros(h.shape[0], np.float32)
    s = row_scales(scb, scale)
    with np.errstate(invalid="ignore", over="ignore"):
        p = (h * s[:, None]).astype(np.float32)
    codes = np.where(np.isnan(p), np.float32(0), np.rint(p)).astype(np.int8)  # rint: half to even
    codes[~np.isfinite(scb)] = 0  # SCB = inf: s = 0 and bnb's NaN -> 0
    return codes, scb


def dequantize_int8(codes: np.ndarray, scb: np.ndarray) -> np.ndarray:
    """Reference dequantization: float32 ``f32(f32(q * SCB) * f32(1/127))``."""
    with np.errstate(invalid="ignore"):
        w = (codes.astype(np.float32) * np.asarray(scb, np.float32)[:, None]).astype(np.float32)
        return (w * INV127).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# transformers' quantization_config


def quantization_config(*, threshold: float, skip_modules: Sequence[str] | None) -> dict[str, Any]:
    """transformers' ``BitsAndBytesConfig(load_in_8bit=True, ...).to_dict()``: all 13 keys.

    ``skip_modules`` None is written as null: transformers then recomputes its default skip list on
    load (what its own save_pretrained writes); a list replaces that default.
    """
    return {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": True,
        "_load_in_4bit": False,
        "llm_int8_threshold": float(threshold),
        "llm_int8_skip_modules": None if skip_modules is None else list(skip_modules),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": "fp4",
        "bnb_4bit_use_double_quant": False,
        "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": "uint8",
        "load_in_4bit": False,
        "load_in_8bit": True,
    }


# --------------------------------------------------------------------------------------------------
# The record


@dataclass(frozen=True)
class Int8Tensor:
    """One LLM.int8 weight: row-major int8 codes and the fp16 row absmax (SCB)."""

    name: str  # the weight key, e.g. "model.layers.0.mlp.down_proj.weight"
    shape: tuple[int, int]  # [out, in]
    dtype: (
        str | None
    )  # the original dtype ("float32" | "float16" | "bfloat16"); None when unknown (bnb files)
    codes: torch.Tensor  # int8 [out, in]
    scb: torch.Tensor  # float32 [out]
    has_weight_format: bool = True

    quant_type = QUANT_TYPE

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if self.dtype is not None and self.dtype not in WEIGHT_DTYPES:
            msg = f"tensor {self.name!r}: dtype {self.dtype!r} is not one of {list(WEIGHT_DTYPES)}"
            raise UnsupportedOption(msg)
        present = {k: (_code(v), tuple(v.shape)) for k, v in self.state_dict().items()}
        check_int8_group("<record>", self.name, present)
        if present[self.name][1] != self.shape:
            got = list(present[self.name][1])
            msg = f"<record>: tensor {self.name!r}: codes {got}, shape {list(self.shape)}"
            raise QuantLayoutMismatch(msg)

    @property
    def n(self) -> int:
        return self.shape[0] * self.shape[1]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """bnb's keys in its ``_save_to_state_dict`` order (weight, SCB, weight_format)."""
        import torch

        out = {self.name: self.codes, scb_key(self.name): self.scb}
        if self.has_weight_format:
            out[weight_format_key(self.name)] = torch.tensor(WEIGHT_FORMAT_ROW, dtype=torch.uint8)
        return out

    def dequantize(self, dtype: str | torch.dtype | None = None) -> torch.Tensor:
        """Reference (numpy) dequantization, cast to ``dtype`` (default: the original dtype, else float32)."""
        import torch

        w = torch.from_numpy(dequantize_int8(self.codes.numpy(), self.scb.numpy()))
        name = dtype if dtype is not None else (self.dtype or "float32")
        target = name if isinstance(name, torch.dtype) else getattr(torch, str(name).removeprefix("torch."))
        return w.to(target)

    @classmethod
    def plan_slots(cls, name: str, shape: Sequence[int]) -> list:
        from formats.writer import TensorSlot

        return [TensorSlot(k, code, shp) for k, (code, shp) in int8_layout(name, shape).items()]

    @classmethod
    def from_state_dict(
        cls,
        name: str,
        tensors: Mapping[str, torch.Tensor],
        *,
        file: str = "<state dict>",
        dtype: str | None = None,
    ) -> Int8Tensor:
        """Rebuild a record from bnb keys (ours or a bnb/transformers-made checkpoint)."""
        import torch

        present = {
            k: (_code(tensors[k]), tuple(tensors[k].shape))
            for k in (name, scb_key(name), weight_format_key(name))
            if k in tensors
        }
        fk = weight_format_key(name)
        info = check_int8_group(
            file, name, present, lambda k: tensors[k].reshape(-1).view(torch.uint8).numpy().tobytes()
        )
        return cls(name, info.shape, dtype, tensors[name], tensors[scb_key(name)], fk in tensors)


def _code(t: torch.Tensor) -> str:
    from formats.writer import DTYPE_CODES

    return DTYPE_CODES.get(t.dtype, str(t.dtype))
