"""The CPU GEMVs with weights from DRAM vs cache-resident: SmolLM2-135M's 210 projections per token.

    python bench/bench_cpu_gemv_cold.py [--isas avx2,avx512,avx512bf16] [--rounds 5]

A decode token reads every layer's weights once, so in a model they come from memory, not from the
caches a repeated single-shape benchmark keeps them in. Each ISA path is timed over the 7 projections
of SmolLM2-135M's layer (bench_cpu_gemv_bf16dot.SMOLLM2_LAYER) with 30 distinct layers' weights (53 MB
of 4-bit codes: from DRAM) and with one layer's weights called 30 times (cache-resident), for the 4-bit
kernel (NF4, blocksize 64, nested absmax, bf16 x; "4bit-f32x": the same weights with float32 x, which
every path runs as exact float32 products: on AVX2 the f32 lookup that bf16 x took before the integer
path) and the int8 one (LLM.int8 codes). One thread, the process's CPU time, best of ``--rounds``
interleaved rounds, milliseconds per token.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ["OMP_NUM_THREADS"] = "1"

import torch
from bench_cpu_gemv_bf16dot import SMOLLM2_LAYER, nf4_weight

from converter.kernels import bnb4bit as kernels
from converter.kernels import int8

LAYERS = 30  # SmolLM2-135M's decoder layers


def token_calls(kind: str, layers: int, isa: str) -> list:
    """Zero-argument calls for one token: LAYERS x 7 projections over ``layers`` distinct layers."""
    x_dtype = torch.float32 if kind == "4bit-f32x" else torch.bfloat16
    xs = {k: torch.randn(1, k).to(x_dtype) for k in (576, 1536)}
    distinct = []
    for _ in range(layers):
        for shape in SMOLLM2_LAYER:
            out_f, in_f = (int(v) for v in shape.split("x"))
            if kind.startswith("4bit"):
                args = nf4_weight(out_f, in_f)[2]
                x = xs[in_f]
                distinct.append(lambda a=args, x=x: kernels.gemv_4bit(x, **a, isa=isa, threads=1))
            else:
                codes, scb = int8.quantize_int8((torch.randn(out_f, in_f) * 0.02).to(torch.bfloat16))
                x = xs[in_f]
                distinct.append(lambda c=codes, s=scb, x=x: int8.gemv_int8(x, c, s, isa=isa, threads=1))
    return distinct * (LAYERS // layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isas", default=None, help="comma-separated (default: every path this CPU runs)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    isas = args.isas.split(",") if args.isas else [i for i in kernels.cpu_isas() if i != "scalar"]
    print(f"1 thread, process CPU time, best of {args.rounds} rounds; ms per token (210 projections)")
    print(f"{'kernel':>9} {'isa':>11} {'from DRAM':>10} {'cached':>8}")
    for kind in ("4bit", "4bit-f32x", "int8"):
        for isa in isas:
            if kind == "int8" and isa == "avx512bf16":
                continue  # the int8 kernels run avx512bf16 as avx512
            runs = {"dram": token_calls(kind, LAYERS, isa), "cached": token_calls(kind, 1, isa)}
            best = dict.fromkeys(runs, float("inf"))
            for _ in range(args.rounds):
                for name, calls in runs.items():
                    start = time.process_time()
                    for call in calls:
                        call()
                    best[name] = min(best[name], time.process_time() - start)
            print(f"{kind:>9} {isa:>11} {best['dram'] * 1e3:10.2f} {best['cached'] * 1e3:8.2f}", flush=True)


if __name__ == "__main__":
    main()
