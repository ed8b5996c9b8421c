"""CPU quantize / dequantize throughput: ours vs bitsandbytes vs memory-copy baselines, side by side.

    python bench/bench_cpu_quantize.py [--repeat 7] [--threads 2]

NF4, blocksize 64, nested absmax, bf16 weights of two LLM shapes. Every number is the median of
--repeat timed runs after one warm-up, in Gparam/s (1e9 weight elements per second). The copy
baselines move the same bf16 tensor: into a fresh buffer (``torch.empty_like(x).copy_(x)``) and into a
preallocated one (``dst.copy_(x)``).
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch
from cpu_timing import median_seconds, parse_args

from converter.kernels import bnb4bit as kernels
from formats import codebooks
from formats.quant_types import QuantType

SHAPES = ((4096, 4096), (4096, 11008))
BLOCKSIZE = 64


def ours_quantize(x: torch.Tensor, threads: int) -> None:
    _, absmax = kernels.quantize_4bit(x, blocksize=BLOCKSIZE, quant_type=QuantType.NF4, threads=threads)
    kernels.quantize_nested(absmax, threads=threads)


def bench_shape(rows: int, cols: int, repeat: int, threads: int) -> list[tuple[str, float, float | None]]:
    """(operation, median seconds, bitsandbytes' seconds for the same operation or None) for one shape."""
    import bitsandbytes.functional as bnb_f

    nf4 = torch.tensor(codebooks.NF4)
    dyn8 = torch.tensor(codebooks.DYNAMIC8)
    x = torch.randn(rows, cols, dtype=torch.float32).to(torch.bfloat16)
    n = x.numel()
    dst = torch.empty_like(x)
    t_copy_new = median_seconds(lambda: torch.empty_like(x).copy_(x), repeat)
    t_copy_pre = median_seconds(lambda: dst.copy_(x), repeat)
    t_ours = median_seconds(lambda: ours_quantize(x, threads), repeat)
    t_bnb = median_seconds(
        lambda: bnb_f.quantize_4bit(x, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True),
        max(1, repeat // 3),
    )
    # Dequantize nf4 -> bf16 from the nested record (absmax decoded first, as bnb does).
    packed, absmax = kernels.quantize_4bit(x, blocksize=BLOCKSIZE, quant_type=QuantType.NF4)
    codes, nested_absmax, offset = kernels.quantize_nested(absmax)

    def ours_dequantize() -> None:
        a = kernels.dequantize_nested(codes, nested_absmax, offset, dyn8, threads=threads)
        kernels.dequantize_4bit(
            packed, a, n=n, blocksize=BLOCKSIZE, quant_map=nf4, out_dtype=torch.bfloat16, threads=threads
        )

    _, state = bnb_f.quantize_4bit(x, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
    bnb_packed = packed.view(-1, 1)
    t_deq = median_seconds(ours_dequantize, repeat)
    t_bnb_deq = median_seconds(lambda: bnb_f.dequantize_4bit(bnb_packed, state), repeat)
    return [
        ("copy bf16 -> new buffer", t_copy_new, None),
        ("copy bf16 -> preallocated", t_copy_pre, None),
        ("bitsandbytes quantize nf4+nested", t_bnb, None),
        ("ours quantize nf4+nested", t_ours, t_bnb),
        ("bitsandbytes dequantize -> bf16", t_bnb_deq, None),
        ("ours dequantize -> bf16", t_deq, t_bnb_deq),
    ]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], default_repeat=7)
    header = f"{'shape':>12} {'operation':<34} {'ms':>9} {'Gparam/s':>9} {'vs bnb':>8} {'vs copy':>8}"
    print(header)
    print("-" * len(header))
    for rows, cols in SHAPES:
        n = rows * cols
        lines = bench_shape(rows, cols, args.repeat, args.threads)
        t_copy_new = lines[0][1]
        for name, seconds, baseline in lines:
            vs_bnb = f"{baseline / seconds:7.1f}x" if baseline else ""
            rate, vs_copy = n / seconds / 1e9, f"{t_copy_new / seconds:7.2f}x"
            print(f"{rows}x{cols:<6} {name:<34} {seconds * 1e3:9.2f} {rate:9.3f} {vs_bnb:>8} {vs_copy:>8}")


if __name__ == "__main__":
    main()
