"""The weights the CUDA GEMV benchmarks time (NF4, blocksize 64, nested absmax) and their GEMV launch."""

from __future__ import annotations

from functools import cache

import torch

from converter.kernels import bnb4bit_cuda as kernels_cuda
from formats import codebooks
from formats.quant_types import QuantType

BLOCKSIZE = 64

#: (packed codes, (nested codes, nested absmax, offset, nested map)): what gemv_4bit takes as nested.
Record = tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]]


@cache
def tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(NF4 quant map, DYNAMIC8 nested map) as float32 on ``device``, made once."""
    return (
        torch.tensor(codebooks.NF4, dtype=torch.float32, device=device),
        torch.tensor(codebooks.DYNAMIC8, dtype=torch.float32, device=device),
    )


def quantize(w: torch.Tensor) -> Record:
    """w quantized on its device, absmax nested in the same call."""
    packed, codes, nabs, off = kernels_cuda.quantize_4bit_nested(
        w, blocksize=BLOCKSIZE, quant_type=QuantType.NF4
    )
    return packed, (codes, nabs, off, tables(w.device)[1])


def gemv(
    x: torch.Tensor, record: Record, out_features: int, in_features: int, variant: int = 0
) -> torch.Tensor:
    """x @ W.T for the record's weight W [out_features, in_features], with the GEMV kernel ``variant``."""
    packed, nested = record
    return kernels_cuda.gemv_4bit(
        x,
        packed,
        None,
        out_features=out_features,
        in_features=in_features,
        blocksize=BLOCKSIZE,
        quant_map=tables(x.device)[0],
        nested=nested,
        variant=variant,
    )
