"""Launch the batch-1 GEMV kernels once each on one large weight, for a profiler to look at.

    ncu --clock-control none -k regex:gemv --launch-skip 2 --launch-count 2 \\
        --section SpeedOfLight --section WarpStateStats python bench/profile_gemv.py 2 6

Arguments: the variants to launch (csrc/cuda/gemv.cu: 1..5 and 10 the CUDA-core kernel, 6..9 the
tensor-core kernel). Every variant runs once as a warm-up, then once more: skip the first len(variants)
launches in the profiler.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converter.kernels import bnb4bit_cuda as kernels_cuda
from formats import codebooks
from formats.quant_types import QuantType


def main() -> None:
    variants = [int(v) for v in sys.argv[1:]] or [0]
    out_f, in_f = 32768, 8192
    w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16)
    packed, codes, nabs, off = kernels_cuda.quantize_4bit_nested(w, blocksize=64, quant_type=QuantType.NF4)
    del w
    nested = (codes, nabs, off, torch.tensor(codebooks.DYNAMIC8, dtype=torch.float32, device="cuda"))
    qmap = torch.tensor(codebooks.NF4, dtype=torch.float32, device="cuda")
    x = torch.randn(1, in_f, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):
        for v in variants:
            kernels_cuda.gemv_4bit(
                x,
                packed,
                None,
                out_features=out_f,
                in_features=in_f,
                blocksize=64,
                quant_map=qmap,
                nested=nested,
                variant=v,
            )
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
