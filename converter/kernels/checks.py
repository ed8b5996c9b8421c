"""Argument checks and shared types of the 4-bit kernels, for every device.

``converter.kernels.bnb4bit`` (CPU, and the public entry points) and ``converter.kernels.bnb4bit_cuda`` (the
CUDA
backend) both run these checks, so a bad argument gets the same one-line message on every device.
This module imports neither of them (it breaks what used to be an import cycle between the two).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from converter.errors import NonFiniteInputError  # noqa: F401  (one type for torch and numpy paths)
from formats.quant_types import check_blocksize, n_blocks, n_nested_blocks

#: Input / output element types of every kernel.
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
#: Largest batch of the fused GEMV; larger batches dequantize and use F.linear.
#: torch dtype -> the extension's name for it (CPU kernels take a name) and code (CUDA kernels an int).
KERNEL_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
KERNEL_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

GEMV_MAX_BATCH = 8
#: Most weights of one several-weights GEMV launch (gemv_4bit_multi: q/k/v, gate/up).
GEMV_MAX_WEIGHTS = 4


class NestedAbsmax(NamedTuple):
    """A nested (double-quantized) absmax record, as stored under ``W.absmax`` / ``W.nested_*``."""

    codes: torch.Tensor  # uint8 [nb]
    nested_absmax: torch.Tensor  # float32 [ceil(nb / 256)]
    offset: float  # a float32 value
    nested_map: torch.Tensor  # float32 [256], the table stored with the tensor


def check_tensor(
    name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...], numel: int | None = None
) -> None:
    if not isinstance(t, torch.Tensor):
        msg = f"{name} must be a torch.Tensor, got {type(t).__name__}"
        raise TypeError(msg)
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        msg = f"{name} has dtype {str(t.dtype).removeprefix('torch.')}: expected {names}"
        raise ValueError(msg)
    if not t.is_contiguous():
        msg = f"{name} is not contiguous (shape {tuple(t.shape)}, stride {t.stride()}): call .contiguous()"
        raise ValueError(msg)
    if numel is not None and t.numel() != numel:
        msg = f"{name} has {t.numel()} elements (shape {tuple(t.shape)}), expected {numel}"
        raise ValueError(msg)


def check_same_device(reference: torch.Tensor, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device != reference.device:
            msg = f"{name} is on {t.device} but the input is on {reference.device}: move them to one device"
            raise ValueError(msg)


# The argument checks of the decoding kernels, one copy for every device: the functions below and
# their CUDA twins in converter.kernels.bnb4bit_cuda (which callers may use directly) both run them.


def _check_absmax(
    reference: torch.Tensor, absmax: torch.Tensor | None, nested: NestedAbsmax | tuple | None, nb: int
) -> NestedAbsmax | None:
    """Exactly one of a float32 absmax [nb] and a nested record of nb codes, on reference's device."""
    if (absmax is None) == (nested is None):
        msg = "pass exactly one of absmax (float32) and nested (NestedAbsmax)"
        raise ValueError(msg)
    if nested is None:
        check_tensor("absmax", absmax, (torch.float32,), nb)
        check_same_device(reference, absmax=absmax)
        return None
    nested = NestedAbsmax(*nested)
    check_tensor("nested.codes", nested.codes, (torch.uint8,), nb)
    check_tensor("nested.nested_absmax", nested.nested_absmax, (torch.float32,), n_nested_blocks(nb))
    check_tensor("nested.nested_map", nested.nested_map, (torch.float32,), 256)
    check_same_device(
        reference, codes=nested.codes, nested_absmax=nested.nested_absmax, nested_map=nested.nested_map
    )
    return nested


def check_dequantize_nested_args(
    codes: torch.Tensor, nested_absmax: torch.Tensor, nested_map: torch.Tensor
) -> None:
    """``dequantize_nested``'s checks (every device)."""
    check_tensor("codes", codes, (torch.uint8,))
    check_tensor("nested_absmax", nested_absmax, (torch.float32,), n_nested_blocks(codes.numel()))
    check_tensor("nested_map", nested_map, (torch.float32,), 256)
    check_same_device(codes, nested_absmax=nested_absmax, nested_map=nested_map)


def check_dequantize_args(
    packed: torch.Tensor,
    absmax: torch.Tensor | None,
    *,
    n: int,
    blocksize: int,
    quant_map: torch.Tensor,
    out_dtype: torch.dtype,
    out: torch.Tensor | None,
    nested: NestedAbsmax | tuple | None = None,
) -> NestedAbsmax | None:
    """``dequantize_4bit``'s checks (every device); returns ``nested`` as a NestedAbsmax (or None)."""
    check_blocksize(blocksize)
    if n < 0:
        msg = f"n must be >= 0, got {n}"
        raise ValueError(msg)
    check_tensor("packed", packed, (torch.uint8,), (n + 1) // 2)
    nested = _check_absmax(packed, absmax, nested, n_blocks(n, blocksize))
    check_tensor("quant_map", quant_map, (torch.float32,), 16)
    if out_dtype not in FLOAT_DTYPES:
        msg = f"out_dtype {out_dtype} is not supported: expected float32, float16 or bfloat16"
        raise ValueError(msg)
    check_same_device(packed, quant_map=quant_map)
    if out is not None:
        check_tensor("out", out, (out_dtype,), n)
        check_same_device(packed, out=out)
    return nested


def check_gemv_args(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor | None,
    *,
    out_features: int,
    in_features: int,
    blocksize: int,
    quant_map: torch.Tensor,
    nested: NestedAbsmax | tuple | None,
) -> tuple[int, NestedAbsmax | None]:
    """``gemv_4bit``'s checks (every device); returns (batch, nested as a NestedAbsmax or None)."""
    check_blocksize(blocksize)
    check_tensor("x", x, FLOAT_DTYPES)
    if x.dim() not in (1, 2) or x.shape[-1] != in_features:
        msg = f"x has shape {tuple(x.shape)}: expected [B, {in_features}] or [{in_features}]"
        raise ValueError(msg)
    batch = 1 if x.dim() == 1 else x.shape[0]
    if not 1 <= batch <= GEMV_MAX_BATCH:
        msg = f"x has batch {batch}: the fused GEMV takes 1..{GEMV_MAX_BATCH}; use dequantize_4bit + F.linear"
        raise ValueError(msg)
    if out_features < 0 or in_features <= 0 or in_features % blocksize:
        msg = (
            f"in_features {in_features} is not a positive multiple of blocksize {blocksize}: the fused GEMV "
            "needs whole blocks per row; use dequantize_4bit + F.linear"
        )
        raise ValueError(msg)
    check_tensor("packed", packed, (torch.uint8,), out_features * in_features // 2)
    check_tensor("quant_map", quant_map, (torch.float32,), 16)
    check_same_device(x, packed=packed, quant_map=quant_map)
    return batch, _check_absmax(x, absmax, nested, out_features * in_features // blocksize)
