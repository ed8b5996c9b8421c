"""Batch-1/4 GEMV inside CUDA graphs: our two tensor-core kernels vs bf16 F.linear vs bitsandbytes.

    python bench/bench_gemv_cuda.py [--replays 20] [--shapes 28672x8192,4096x4096] [--json out.json]

For each weight shape, L layers of distinct random weights (L so that the 4-bit bytes of all layers
exceed 3x the L2 cache, at least 8) are launched back to back and captured in one CUDA graph; the
graph's replay is timed with CUDA events (median of --replays) and divided by L. Contenders: the
gemv_mma.cu kernel (variant 20, "mma"), the lean kernel of gemv_stream.cu (variant 11, "stream", and
its forced configurations 12..18 at batch 1), the default (variant 0), bf16 ``F.linear`` (cuBLAS) and
bitsandbytes' ``matmul_4bit`` (its gemv_4bit kernel at batch 1). "% floor" is the memory floor
(4-bit codes + nested absmax codes and nested absmax + activations, read once) over the time, with
the floor's bandwidth a device-to-device copy measured in the same run (bytes read + written / s).
NF4, blocksize 64, nested absmax, bf16 activations.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cuda_nf4
from cuda_timing import copy_bandwidth, time_graph

from converter.kernels import bnb4bit_cuda as kernels_cuda

#: (out_features, in_features): Llama-70B-like MLP (28672x8192, 8192x28672) and attention (8192x8192),
#: Llama-8B's q/o (4096x4096), MLP (14336x4096, 4096x14336) and k/v (1024x4096).
SHAPES = (
    (28672, 8192),
    (8192, 8192),
    (8192, 28672),
    (4096, 4096),
    (14336, 4096),
    (4096, 14336),
    (1024, 4096),
)
BATCHES = (1, 4)
#: Forced configurations of the stream kernel timed at batch 1 (csrc/cuda/gemv_stream.cuh).
STREAM_FORCED = (12, 13, 14, 15, 16, 17)


def bench_shape(out_f: int, in_f: int, bw: float, replays: int, bnb, l2: int) -> list[dict]:
    n = out_f * in_f
    q_bytes = n // 2 + n // 64 + 4 * (n // 64 // 256)  # codes + nested codes + nested absmax
    layers = max(8, -(-3 * l2 // q_bytes))
    ours, theirs, dense = [], [], []
    for _ in range(layers):
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) * 0.02
        ours.append(cuda_nf4.quantize(w))
        if bnb is not None:
            theirs.append(
                bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            )
        dense.append(w)
    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, in_f, device="cuda", dtype=torch.bfloat16)
        floor_s = (q_bytes + 2 * batch * in_f) / bw

        def ours_all(variant: int, x=x) -> None:
            for record in ours:
                cuda_nf4.gemv(x, record, out_f, in_f, variant)

        contenders: dict[str, Callable[[], object]] = {
            "mma (v20)": lambda: ours_all(20),
            "stream (v11)": lambda: ours_all(11),
            "default (v0)": lambda: ours_all(0),
        }
        if batch == 1:
            for v in STREAM_FORCED:
                contenders[f"stream v{v}"] = lambda v=v: ours_all(v)
        contenders["bf16 F.linear"] = lambda x=x: [torch.nn.functional.linear(x, w) for w in dense]
        if bnb is not None:
            contenders["bnb matmul_4bit"] = lambda x=x: [
                bnb.matmul_4bit(x, p.t(), quant_state=s) for p, s in theirs
            ]
        times = {}
        for name, fn in contenders.items():
            try:
                times[name] = time_graph(fn, replays) / layers
            except Exception as exc:  # a contender that cannot be captured: say so, keep the others
                print(f"  {name}: not timed ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})")
        bf16_t = times.get("bf16 F.linear")
        for name, t in times.items():
            r = {
                "shape": f"{out_f}x{in_f}",
                "batch": batch,
                "kernel": name,
                "layers": layers,
                "us": t * 1e6,
                "floor_us": floor_s * 1e6,
                "fraction_of_floor": floor_s / t,
                "vs_bf16": None if bf16_t is None else bf16_t / t,
            }
            rows.append(r)
            vs = "" if bf16_t is None else f"  {r['vs_bf16']:5.2f}x bf16"
            print(
                f"{r['shape']:>11} B={batch} {name:<16} {r['us']:8.1f} us  "
                f"{100 * r['fraction_of_floor']:5.1f}% of floor {r['floor_us']:6.1f} us{vs}",
                flush=True,
            )
    # Guard: the timed kernels compute the same product (both within bf16-class error of each other).
    x = torch.randn(1, in_f, device="cuda", dtype=torch.bfloat16)
    y_old = cuda_nf4.gemv(x, ours[0], out_f, in_f, 20).double()
    y_new = cuda_nf4.gemv(x, ours[0], out_f, in_f, 11).double()
    rel = ((y_new - y_old).norm() / y_old.norm()).item()
    assert rel < 1e-2, f"stream vs mma relative difference {rel} on {out_f}x{in_f}"
    for held in (ours, theirs, dense):
        held.clear()
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--shapes", default="", help="comma list like 28672x8192 (default: all)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    usable, why = kernels_cuda.cuda_status()
    if not usable:
        sys.exit(f"bench_gemv_cuda.py needs the CUDA backend: {why}")
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional  # noqa: F401  (bnb.functional)
    except ImportError:
        bnb = None
        print("bitsandbytes not installed: no bnb column")
    shapes = SHAPES
    if args.shapes:
        shapes = tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes.split(","))
    props = torch.cuda.get_device_properties(0)
    t0 = time.perf_counter()
    bw = copy_bandwidth(args.replays, graph=True)
    print(
        f"device {props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MiB; "
        f"torch {torch.__version__}; bitsandbytes {getattr(bnb, '__version__', None)}; "
        f"copy bandwidth {bw / 1e9:.0f} GB/s (read + write), graph replays, median of {args.replays}"
    )
    rows = []
    for out_f, in_f in shapes:
        rows += bench_shape(out_f, in_f, bw, args.replays, bnb, props.L2_cache_size)
    print(f"total {time.perf_counter() - t0:.1f} s")
    print("\nsummary: us per layer (% of floor)")
    names = ("mma (v20)", "stream (v11)", "default (v0)", "bf16 F.linear", "bnb matmul_4bit")
    print(f"{'shape':>11} {'B':>2} " + " ".join(f"{n:>20}" for n in names))
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for batch in BATCHES:
            got = {r["kernel"]: r for r in rows if r["shape"] == shape and r["batch"] == batch}
            cells = [
                f"{got[n]['us']:9.1f} ({100 * got[n]['fraction_of_floor']:4.0f}%)" if n in got else "-"
                for n in names
            ]
            print(f"{shape:>11} {batch:>2} " + " ".join(f"{c:>20}" for c in cells))
    if args.json:
        args.json.write_text(
            json.dumps({"device": props.name, "copy_GBps": bw / 1e9, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
