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

import cuda_nf4


def main() -> None:
    variants = [int(v) for v in sys.argv[1:]] or [0]
    out_f, in_f = 32768, 8192
    w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16)
    record = cuda_nf4.quantize(w)
    del w
    x = torch.randn(1, in_f, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):
        for v in variants:
            cuda_nf4.gemv(x, record, out_f, in_f, v)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
