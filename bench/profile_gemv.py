"""Launch the batch-1 GEMV kernels once each on given shapes, for a profiler to look at.

    ncu --clock-control none -k regex:gemv_stream --launch-skip 1 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats python bench/profile_gemv.py 28672x8192 --variant 11

Every shape runs once as a warm-up and once more, each on its own weight: profile the second launch
of each (the first of a shape pays lazy set-up).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cuda_nf4
from need_cuda import require_cuda


def shape(text: str) -> tuple[int, int]:
    """``OUTxIN`` -> (out_features, in_features)."""
    try:
        out_f, in_f = (int(v) for v in text.split("x"))
    except ValueError:
        msg = f"{text!r} is not OUTxIN (e.g. 4096x4096)"
        raise argparse.ArgumentTypeError(msg) from None
    return out_f, in_f


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("shapes", nargs="*", type=shape, default=[(28672, 8192)], help="OUTxIN")
    parser.add_argument("--variant", type=int, default=0, help="csrc/cuda/gemv.cu variant (0: default)")
    parser.add_argument("--batch", type=int, default=1)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    require_cuda(__file__)
    for out_f, in_f in args.shapes:
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16)
        record = cuda_nf4.quantize(w)
        del w
        x = torch.randn(args.batch, in_f, device="cuda", dtype=torch.bfloat16)
        for _ in range(2):
            cuda_nf4.gemv(x, record, out_f, in_f, args.variant)
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
