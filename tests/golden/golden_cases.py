"""The inputs of the bitsandbytes-CUDA golden files, regenerated from seeds.

bench/gen_golden.py (run once on a GPU with bitsandbytes 0.50.2) quantizes these inputs with bnb's
CUDA kernels and stores the outputs in tests/golden/bnb_cuda_golden.npz; test_bnb_cuda_golden.py
regenerates the same inputs on the CPU and checks our kernels against those bytes. Changing
anything here invalidates the golden file: regenerate it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    seed: int
    n: int
    dtype: str  # "float32" | "float16" | "bfloat16"
    quant_type: str  # "nf4" | "fp4"
    blocksize: int
    nested: bool
    zero_every: int  # every zero_every-th block is all zeros (0: none)
    scale: float

    @property
    def key(self) -> str:
        return f"case{self.seed}"

    def as_dict(self) -> dict:
        return asdict(self)


def make_input(case: Case) -> torch.Tensor:
    """float32 N(0, scale) draws from numpy.random.default_rng(seed), zero blocks, cast to the dtype."""
    rng = np.random.default_rng(case.seed)
    x = rng.standard_normal(case.n, dtype=np.float32) * np.float32(case.scale)
    if case.zero_every:
        for b in range(0, -(-case.n // case.blocksize), case.zero_every):
            x[b * case.blocksize : (b + 1) * case.blocksize] = 0.0
    return torch.from_numpy(x).to(DTYPES[case.dtype])


def cases() -> list[Case]:
    """NF4/FP4 x nested or not x three dtypes x all blocksizes, odd sizes and zero blocks (~3 MB)."""
    out: list[Case] = []
    seed = 1
    sizes = (1, 63, 4097, 40_001, 32_768)
    for quant_type in ("nf4", "fp4"):
        for nested in (False, True):
            for di, dtype in enumerate(DTYPES):
                for bi, blocksize in enumerate((32, 64, 128, 256, 512, 1024, 2048, 4096)):
                    n = sizes[(bi + di) % len(sizes)]
                    if blocksize == 64:
                        n = 131_073  # the transformers blocksize: a larger, odd tensor
                    out.append(
                        Case(seed, n, dtype, quant_type, blocksize, nested, 5 + (bi % 3), (0.02, 1.0)[bi % 2])
                    )
                    seed += 1
    return out


def unpack_codes(packed: np.ndarray) -> np.ndarray:
    """All 2 * len(packed) nibbles, first element (high nibble) first; the odd-tail pad included."""
    p = np.asarray(packed, dtype=np.uint8).ravel()
    codes = np.empty(p.size * 2, dtype=np.uint8)
    codes[0::2] = p >> 4
    codes[1::2] = p & 0x0F
    return codes


def classify_code_diffs(
    x: np.ndarray, absmax: np.ndarray, ours: np.ndarray, bnb: np.ndarray, blocksize: int, quant_type: str
) -> dict[str, int]:
    """Count where bnb CUDA's 4-bit codes differ from ours, by cause.

    - ``zero_block``: an all-zero block (bnb CUDA: 0 * inf = NaN -> code 0; ours: the code of 0.0).
    - ``reciprocal``: s = x * (1/absmax) within 4 ulp of a decision threshold, where bnb's approximate
      reciprocal (MUFU.RCP, --use_fast_math) can land on the other side.
    - ``unexplained``: anything else (must be 0).
    """
    from formats import codebooks

    codes_o, codes_b = unpack_codes(ours), unpack_codes(bnb)
    xs = np.zeros(codes_o.size, dtype=np.float32)
    xs[: x.size] = x
    diff = np.nonzero(codes_o != codes_b)[0]
    counts = {"elements": int(x.size), "differing_codes": int(diff.size), "zero_block": 0, "reciprocal": 0}
    if diff.size == 0:
        counts["unexplained"] = 0
        return counts
    am = np.asarray(absmax, dtype=np.float32)[diff // blocksize]
    zero = am == 0
    inv = (np.float32(1.0) / np.maximum(am, np.float32(1e-38))).astype(np.float32)
    s = (xs[diff] * inv).astype(np.float32)
    if quant_type == "nf4":
        t = np.asarray(codebooks.NF4_THRESHOLDS, dtype=np.float32)
    else:
        t = np.asarray(codebooks.FP4_THRESHOLDS, dtype=np.float32)
        s = np.abs(s)
    dist = np.abs(s[:, None] - t[None, :]).min(axis=1)
    near = dist <= 4 * np.spacing(np.abs(s)).astype(np.float32)
    counts["zero_block"] = int(zero.sum())
    counts["reciprocal"] = int((near & ~zero).sum())
    counts["unexplained"] = int((~near & ~zero).sum())
    return counts
