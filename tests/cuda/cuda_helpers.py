"""Inputs for the CUDA tests: random tensors with the awkward cases mixed in."""

from __future__ import annotations

import numpy as np
import torch

from formats import codebooks

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Odd and awkward element counts (Marlin's test_tiles style): tails, single elements, > one CTA.
SIZES = (1, 2, 3, 17, 31, 33, 63, 65, 118, 255, 1023, 4095, 4097, 12345, 65537, 300_001)


def awkward_input(n: int, blocksize: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """N(0, sigma) values plus, block by block: all-zero blocks (with a -0.0), subnormal/tiny values,
    values near the dtype's max, and blocks of absmax 1.0 whose elements sit on NF4/FP4 thresholds
    and one ulp either side of them."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32) * np.float32(rng.choice([1e-3, 1.0, 50.0]))
    finfo = torch.finfo(dtype)
    thresholds = np.asarray(codebooks.NF4_THRESHOLDS + codebooks.FP4_THRESHOLDS, dtype=np.float32)
    near = np.concatenate(
        [thresholds, np.nextafter(thresholds, np.float32(2)), np.nextafter(thresholds, np.float32(-2))]
    ).astype(np.float32)
    for b in range(-(-n // blocksize)):
        lo, hi = b * blocksize, min(n, (b + 1) * blocksize)
        kind = (b + seed) % 7
        if kind == 1:
            x[lo:hi] = 0.0
            x[lo] = -0.0
        elif kind == 2:
            x[lo:hi] *= np.float32(finfo.tiny)
        elif kind == 3:
            big = x[lo:hi].astype(np.float64) * (finfo.max / 8)
            x[lo:hi] = np.clip(big, -finfo.max, finfo.max).astype(np.float32)
        elif kind == 4 and hi - lo >= 2:
            x[lo] = 1.0
            picks = rng.choice(near, size=hi - lo - 1) * rng.choice(np.float32([-1, 1]), size=hi - lo - 1)
            x[lo + 1 : hi] = picks
    # In 16-bit dtypes the threshold values round: they stay near the thresholds, which is the point.
    return torch.from_numpy(x).to(dtype)
