"""Launch the MoE decode kernels (gate/up + SiLU, down + routing sum) a few times, for a profiler.

    ncu --clock-control none -k regex:grouped_glu --launch-skip 2 --launch-count 1 --set full \\
        python bench/profile_moe_gemv.py [--lanes 0]

One layer of bench_moe_gemv_cuda.py (Qwen3-30B-A3B's expert shapes, 128 experts, top-8 routing, batch
1); each step routes to other experts, so the profiled launch reads its weights from device memory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_moe_gemv_cuda import Layer
from need_cuda import require_cuda


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lanes", type=int, default=0, help="0: the kernel's choice; 8 / 16 / 32 forced")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    require_cuda(__file__)
    layer = Layer(args.steps, args.batch, seed=0)
    for s in range(args.steps):
        layer.glu(s, args.lanes)
        layer.sum(s, args.lanes)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
