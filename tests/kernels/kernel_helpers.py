"""Shared helpers of the kernel tests: inputs that hit the edge cases, and the numpy oracle."""

from __future__ import annotations

import numpy as np
import torch

from formats import codebooks
from formats.quant_types import QuantType

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def as_f32_numpy(x: torch.Tensor) -> np.ndarray:
    """The exact float32 widening of a CPU tensor (bf16/f16 -> f32 is exact)."""
    return x.detach().to(torch.float32).contiguous().view(-1).numpy()


def codebook_tensor(quant_type: QuantType) -> torch.Tensor:
    return torch.tensor(quant_type.codebook, dtype=torch.float32)


def dynamic8_tensor() -> torch.Tensor:
    return torch.tensor(codebooks.DYNAMIC8, dtype=torch.float32)


def edge_case_input(n: int, blocksize: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Normal values plus the awkward ones: all-zero blocks, subnormals, huge values, and elements
    whose scaled value s = x * (1/absmax) lands exactly on an NF4 or FP4 threshold."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32) * np.float32(rng.choice([1e-3, 1.0, 50.0]))
    nb = -(-n // blocksize)
    finfo = torch.finfo(dtype)
    for b in range(nb):
        lo, hi = b * blocksize, min(n, (b + 1) * blocksize)
        kind = b % 6
        if kind == 1:
            x[lo:hi] = 0.0  # all-zero block (and -0.0 in it)
            x[lo] = -0.0
        elif kind == 2:
            x[lo:hi] *= np.float32(finfo.tiny)  # subnormal / tiny values of the dtype
        elif kind == 3:
            big = x[lo:hi].astype(np.float64) * (finfo.max / 8)  # float64: no overflow before the clip
            x[lo:hi] = np.clip(big, -finfo.max, finfo.max).astype(np.float32)
        elif kind == 4 and hi - lo >= 3:
            # absmax 1.0 (exactly representable in every dtype): s == x, so put x on thresholds.
            x[lo:hi] = np.clip(x[lo:hi], -0.99, 0.99)
            x[lo] = 1.0
            thresholds = codebooks.NF4_THRESHOLDS + codebooks.FP4_THRESHOLDS
            t = np.asarray(thresholds, dtype=np.float32)
            picks = rng.choice(t, size=hi - lo - 1)
            signs = rng.choice(np.asarray([-1.0, 1.0], dtype=np.float32), size=hi - lo - 1)
            x[lo + 1 : hi] = picks * signs
    out = torch.from_numpy(x).to(dtype)
    return out


def bnb_quant_state(packed_absmax: torch.Tensor, shape, dtype, blocksize, quant_type, nested=None):
    """A bitsandbytes QuantState for our record (nested: (codes, nested_absmax, offset))."""
    from bitsandbytes.functional import QuantState

    if nested is None:
        return QuantState(
            absmax=packed_absmax,
            shape=torch.Size(shape),
            code=codebook_tensor(quant_type),
            blocksize=blocksize,
            quant_type=quant_type.label,
            dtype=dtype,
        )
    codes, nested_absmax, offset = nested
    state2 = QuantState(absmax=nested_absmax, code=dynamic8_tensor(), blocksize=256, dtype=torch.float32)
    return QuantState(
        absmax=codes,
        shape=torch.Size(shape),
        code=codebook_tensor(quant_type),
        blocksize=blocksize,
        quant_type=quant_type.label,
        dtype=dtype,
        offset=torch.tensor(offset, dtype=torch.float32),
        state2=state2,
    )
