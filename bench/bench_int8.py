"""LLM.int8 on the CPU, side by side: quantize (ours vs bitsandbytes' CPU op) and the batch-1..8 GEMV.

    cd /tmp && python /path/to/bench/bench_int8.py [--repeat 10] [--threads 2] [--clock wall|cpu]
    cd /tmp && python /path/to/bench/bench_int8.py --device cuda [--iters 50]   (bench_int8_cuda.py)

Quantize: a bf16 [11008, 4096] weight (and [4096, 11008]) to int8 codes + SCB, in Gparam/s. bnb's
path is what ``Int8Params`` runs: ``.to(float16)`` then ``int8_vectorwise_quant``; a plain copy of the
bf16 tensor is the memory-bandwidth floor. GEMV: ``y = x @ W.T`` with bf16 x, ours (fused int8 GEMV)
against ``F.linear`` with the bf16 weight, against our dequantize + ``F.linear`` and against
bitsandbytes' ``Linear8bitLt`` forward (int8 x int8, threshold 6). Medians of --repeat calls.
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import argparse
import logging
import sys
import warnings

import bitsandbytes as bnb  # registers torch.ops.bitsandbytes (the side-by-side oracle)
import torch
import torch.nn.functional as F
from cpu_timing import median_seconds, parse_args

from converter.kernels import int8 as kernels_int8
from converter.loader import int8_ops

QUANT_SHAPES = ((11008, 4096), (4096, 11008))
GEMV_SHAPES = ((4096, 4096), (11008, 4096))
BATCHES = (1, 4, 8)


def bench_quantize(repeat: int, threads: int) -> None:
    print("\nquantize bf16 -> int8 (codes + SCB), Gparam/s")
    print("  ours = fresh outputs (as the converter); reused = out= a preallocated buffer; copy = w.clone()")
    print(f"{'shape':>14} {'ours':>8} {'reused':>8} {'bnb cpu':>8} {'copy':>8} {'ours/bnb':>9}")
    for rows, cols in QUANT_SHAPES:
        w = (torch.randn(rows, cols) * 0.02).to(torch.bfloat16)
        n = w.numel() / 1e9
        t_ours = median_seconds(lambda w=w: kernels_int8.quantize_int8(w, threads=threads), repeat)
        out = (torch.empty(rows * cols, dtype=torch.int8), torch.empty(rows))
        t_reuse = median_seconds(
            lambda w=w, o=out: kernels_int8.quantize_int8(w, out=o, threads=threads), repeat
        )
        t_bnb = median_seconds(
            lambda w=w: torch.ops.bitsandbytes.int8_vectorwise_quant.default(w.to(torch.float16), 0.0), repeat
        )
        t_copy = median_seconds(lambda w=w: w.clone(), repeat)
        print(
            f"{rows}x{cols:>6} {n / t_ours:8.2f} {n / t_reuse:8.2f} {n / t_bnb:8.2f} {n / t_copy:8.2f} "
            f"{t_bnb / t_ours:8.1f}x"
        )


def bench_gemv(repeat: int, threads: int) -> None:
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    print("\nGEMV y = x @ W.T, bf16 x, milliseconds (ratio: bf16 F.linear / ours)")
    head = f"{'shape':>12} {'B':>2} {'ours int8':>10} {'bf16 linear':>12} {'deq+linear':>11} {'bnb 8bit':>9}"
    print(head + f" {'bf16/ours':>10}")
    for out_f, in_f in GEMV_SHAPES:
        w = (torch.randn(out_f, in_f) * 0.02).to(torch.bfloat16)
        codes, scb = kernels_int8.quantize_int8(w)
        layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=False, has_fp16_weights=False, threshold=6.0)
        layer.weight = bnb.nn.Int8Params(
            codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scb
        )
        layer.state.CB, layer.state.SCB = codes, scb
        layer.eval()
        for b in BATCHES:
            x = torch.randn(b, in_f).to(torch.bfloat16)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t_ours = median_seconds(
                    lambda x=x, c=codes, s=scb: kernels_int8.gemv_int8(x, c, s, threads=threads), repeat
                )
                t_bf16 = median_seconds(lambda x=x, w=w: F.linear(x, w), repeat)
                t_deq = median_seconds(
                    lambda x=x, c=codes, s=scb: F.linear(x, int8_ops.dequantize(c, s, torch.bfloat16)),
                    max(3, repeat // 3),
                )
                t_bnb = median_seconds(lambda x=x, m=layer: m(x), max(3, repeat // 3))
            print(
                f"{out_f}x{in_f:>5} {b:2d} {1e3 * t_ours:10.3f} {1e3 * t_bf16:12.3f} {1e3 * t_deq:11.3f} "
                f"{1e3 * t_bnb:9.3f} {t_bf16 / t_ours:9.2f}x"
            )


def main() -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    known, rest = pre.parse_known_args()
    if known.device == "cuda":  # its own options: bench_int8_cuda.py --help
        import bench_int8_cuda

        bench_int8_cuda.main(rest)
        return
    sys.argv = [sys.argv[0], *rest]
    args = parse_args(__doc__.splitlines()[0], default_repeat=10)
    bench_quantize(args.repeat, args.threads)
    bench_gemv(args.repeat, args.threads)


if __name__ == "__main__":
    main()
