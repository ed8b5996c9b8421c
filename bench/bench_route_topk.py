"""The MoE router after its linear on CUDA: torch's op sequence (softmax float32, topk, sum, divide, cast:
what transformers' Qwen/OLMoE/Mixtral routers run) vs the fused ``quantize_model::route_topk`` kernel.

Each variant is captured 48 times in one CUDA graph (a decode step's 48 layers, as bench/bench_moe.py's
whole-model decode replays them) and the replay timed; µs per call = replay / 48. Also prints the
configuration the self-check adopted and whether the outputs are bit-identical.

    python bench/bench_route_topk.py [--experts 128] [--k 8] [--tokens 1] [--dtype bfloat16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_timing import time_graph
from need_cuda import require_cuda

from converter.loader import router

CALLS = 48


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--no-renorm", action="store_true")
    ap.add_argument("--replays", type=int, default=200)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    require_cuda(__file__)
    dtype = getattr(torch, args.dtype)
    renorm = not args.no_renorm
    config = router.decide(torch.device("cuda"), dtype, args.experts, args.k, renorm, dtype)
    print(f"self-check: E={args.experts} k={args.k} renorm={renorm} {dtype}: adopted {config}")
    rows = []
    for tokens in args.tokens:
        xs = [router.check_batch(args.experts, dtype, rows=max(tokens, 8), seed=s)[:tokens].cuda()
              for s in range(CALLS)]  # fmt: skip
        ref = [router.route_torch(x, args.k, renorm, dtype) for x in xs]
        got = [router.route(x, args.k, renorm, dtype) for x in xs]
        exact = all(
            torch.equal(a[1], b[1]) and torch.equal(a[0], b[0]) for a, b in zip(ref, got, strict=True)
        )
        t_torch = time_graph(
            lambda xs=xs: [router.route_torch(x, args.k, renorm, dtype) for x in xs], args.replays
        )
        t_fused = time_graph(lambda xs=xs: [router.route(x, args.k, renorm, dtype) for x in xs], args.replays)
        row = dict(tokens=tokens, experts=args.experts, k=args.k, dtype=args.dtype, renorm=renorm)
        row.update(torch_us=t_torch / CALLS * 1e6, fused_us=t_fused / CALLS * 1e6, exact=exact, config=config)
        rows.append(row)
        t_us, f_us = row["torch_us"], row["fused_us"]
        print(f"T={tokens:4d} torch ops {t_us:7.2f} µs/call, fused {f_us:7.2f} µs/call, x{t_us / f_us:.1f}, "
              f"bit-identical: {exact}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
