"""CPU fused 4-bit GEMV vs torch F.linear on the dense weight, side by side.

    python bench/bench_cpu_gemv.py [--repeat 20] [--threads 2]

NF4, blocksize 64, nested absmax (decoded inline), bf16 activations; batch 1, 4 and 8. The
baselines are ``F.linear`` with the same weight in bf16 and in f32. Times are medians of --repeat
runs after a warm-up.
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch
import torch.nn.functional as F
from cpu_timing import median_seconds, parse_args

from converter.kernels import bnb4bit as kernels
from formats import codebooks
from formats.quant_types import QuantType

SHAPES = ((4096, 4096), (11008, 4096))  # (out_features, in_features)
BATCHES = (1, 4, 8)
BLOCKSIZE = 64


#: time.perf_counter (wall clock) or time.thread_time (CPU time of this thread; with --clock cpu every
#: contender runs on one thread, so a machine shared with other work disturbs the numbers less).
def bench_shape(
    out_features: int, in_features: int, repeat: int, threads: int
) -> list[tuple[int, float, float, float]]:
    """(batch, ours, bf16 F.linear, f32 F.linear) median seconds for one weight shape."""
    w = torch.randn(out_features, in_features).to(torch.bfloat16)
    packed, absmax = kernels.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type=QuantType.NF4)
    codes, nested_absmax, offset = kernels.quantize_nested(absmax)
    nested = kernels.NestedAbsmax(codes, nested_absmax, offset, torch.tensor(codebooks.DYNAMIC8))
    qm = torch.tensor(codebooks.NF4)
    w_bf16 = w.contiguous()
    w_f32 = w.float()
    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, in_features).to(torch.bfloat16)
        x_f32 = x.float()

        def ours(x: torch.Tensor = x) -> torch.Tensor:
            return kernels.gemv_4bit(
                x,
                packed,
                None,
                out_features=out_features,
                in_features=in_features,
                blocksize=BLOCKSIZE,
                quant_map=qm,
                nested=nested,
                threads=threads,
            )

        t_ours = median_seconds(ours, repeat)
        t_bf16 = median_seconds(lambda x=x: F.linear(x, w_bf16), repeat)
        t_f32 = median_seconds(lambda x=x_f32: F.linear(x, w_f32), repeat)
        rows.append((batch, t_ours, t_bf16, t_f32))
    return rows


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], default_repeat=20)
    columns = ("ours ms", "bf16 ms", "f32 ms", "vs bf16", "vs f32", "ours GB/s")
    header = f"{'out x in':>11} {'B':>2} " + " ".join(f"{c:>9}" for c in columns)
    print(header)
    print("-" * len(header))
    for out_features, in_features in SHAPES:
        # Bytes the fused kernel must read: packed codes + nested absmax codes (+ tiny tables).
        weight_bytes = out_features * in_features // 2 + out_features * in_features // BLOCKSIZE
        for batch, t_ours, t_bf16, t_f32 in bench_shape(out_features, in_features, args.repeat, args.threads):
            cells = (
                f"{t_ours * 1e3:9.3f}",
                f"{t_bf16 * 1e3:9.3f}",
                f"{t_f32 * 1e3:9.3f}",
                f"{t_bf16 / t_ours:8.2f}x",
                f"{t_f32 / t_ours:8.2f}x",
                f"{weight_bytes / t_ours / 1e9:9.1f}",
            )
            print(f"{out_features:>5}x{in_features:<5} {batch:>2} " + " ".join(cells))


if __name__ == "__main__":
    main()
