"""CUDA kernels vs bitsandbytes vs a device-to-device copy, side by side on one GPU, in one run.

    python bench/bench_cuda.py [--quick] [--ops quantize,dequantize,gemv] [--json out.json]

Each op is timed with CUDA events around each call (median of many, after warm-up), with the host
queueing all calls ahead of the GPU (so the numbers are GPU time, not Python launch overhead); inputs
rotate through enough buffers to exceed twice the L2 cache, so every call reads from device memory.
"Gparam/s" is input elements per second; "floor" is the op's bytes (each input read once, each
output written once) over the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cuda_nf4
from cuda_timing import copy_bandwidth, rotation_for, time_op

from converter.kernels import bnb4bit_cuda as kernels_cuda
from formats.quant_types import QuantType

SHAPES = ((4096, 4096), (14336, 4096), (8192, 8192), (32768, 8192))


def bench_shape(shape, bw, iters, bnbf, bnb, ops=("quantize", "dequantize", "gemv")) -> list[dict]:
    out_f, in_f = shape
    n = out_f * in_f
    rot = rotation_for(2 * n)
    xs = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(rot)]
    rows = []

    def row(op, ours_s, base_s, base_name, floor_bytes, copy_s=None):
        r = {
            "op": op,
            "shape": f"{out_f}x{in_f}",
            "ours_us": ours_s * 1e6,
            "ours_gparams": n / ours_s / 1e9,
            "floor_us": floor_bytes / bw * 1e6,
            "fraction_of_floor": floor_bytes / bw / ours_s,
            "baseline": base_name,
            "baseline_us": None if base_s is None else base_s * 1e6,
            "speedup": None if base_s is None else base_s / ours_s,
        }
        if copy_s is not None:
            r["copy_us"] = copy_s * 1e6
        rows.append(r)
        print(
            f"{op:<24} {r['shape']:>11}  ours {r['ours_us']:9.1f} us {r['ours_gparams']:7.0f} Gp/s "
            f"({100 * r['fraction_of_floor']:4.0f}% of floor {r['floor_us']:7.1f} us)  "
            + ("" if base_s is None else f"{base_name} {base_s * 1e6:9.1f} us  x{r['speedup']:.1f}"),
            flush=True,
        )

    dsts = [torch.empty_like(x) for x in xs[:2]]
    copy_s = time_op(lambda i: dsts[i % 2].copy_(xs[i]), rot, iters)
    q_bytes = 2 * n + n / 2 + n / 64 + 4 * n / 64 / 256

    for qt in (QuantType.NF4, QuantType.FP4) if "quantize" in ops else ():

        def ours_nested(i, qt=qt):
            _, absmax, _ = kernels_cuda._launch_quantize(xs[i], 64, qt)
            kernels_cuda._launch_nested(absmax)

        t_o = time_op(ours_nested, rot, iters)
        t_b = None
        if bnbf is not None:
            t_b = time_op(
                lambda i, qt=qt: bnbf.quantize_4bit(
                    xs[i], blocksize=64, compress_statistics=True, quant_type=qt.label
                ),
                rot,
                iters,
            )
        row(f"quantize {qt.label} nested", t_o, t_b, "bnb", q_bytes, copy_s)

    if "quantize" in ops:
        t_o = time_op(lambda i: kernels_cuda._launch_quantize(xs[i], 64, QuantType.NF4), rot, iters)
        t_b = None
        if bnbf is not None:
            t_b = time_op(lambda i: bnbf.quantize_4bit(xs[i], blocksize=64, quant_type="nf4"), rot, iters)
        row("quantize nf4 plain", t_o, t_b, "bnb", 2 * n + n / 2 + 4 * n / 64, copy_s)

    # Quantized records (ours and bnb's) of each rotated input, for dequantize and GEMV.
    qmap = cuda_nf4.tables(xs[0].device)[0]
    qrot = rotation_for(n // 2 + n // 64)
    recs, brecs = [], []
    for i in range(qrot):
        x = xs[i % rot]
        recs.append(cuda_nf4.quantize(x))
        if bnbf is not None:
            brecs.append(bnbf.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4"))
    outs = [torch.empty(n, dtype=torch.bfloat16, device="cuda") for _ in range(2)]

    def ours_deq(i):
        packed, nest = recs[i]
        kernels_cuda.dequantize_4bit(
            packed,
            None,
            n=n,
            blocksize=64,
            quant_map=qmap,
            out_dtype=torch.bfloat16,
            out=outs[i % 2],
            nested=nest,
        )

    if "dequantize" in ops:
        t_o = time_op(ours_deq, qrot, iters)
        t_b = None
        if bnbf is not None:
            t_b = time_op(lambda i: bnbf.dequantize_4bit(brecs[i][0], brecs[i][1]), qrot, iters)
        row("dequantize nf4 nested", t_o, t_b, "bnb", n / 2 + n / 64 + 2 * n, copy_s)

    def gemv(i, x, variant=0):
        cuda_nf4.gemv(x, recs[i], out_f, in_f, variant)

    # Batch-1 GEMV: ours vs bnb matmul_4bit vs bf16 F.linear (weights rotated too).
    xv = torch.randn(1, in_f, device="cuda", dtype=torch.bfloat16)
    g_bytes = n / 2 + n / 64 + 2 * in_f + 2 * out_f
    if "gemv" in ops:
        t_o = time_op(lambda i: gemv(i, xv), qrot, iters)
        # Forced configurations (csrc/cuda/gemv.cu): 1..5 the CUDA-core kernel, 6..9 the tensor-core
        # kernel with 1, 2, 4 or 8 warps per 16-row tile, 10 the CUDA-core kernel's default.
        for variant in range(1, 11):
            t_v = time_op(lambda i, v=variant: gemv(i, xv, v), qrot, iters)
            row(f"gemv b1 variant {variant}", t_v, None, "", g_bytes)
        if bnb is not None:
            t_b = time_op(
                lambda i: bnb.matmul_4bit(xv, brecs[i][0].t(), quant_state=brecs[i][1]), qrot, iters
            )
            row("gemv b1 vs bnb", t_o, t_b, "bnb matmul_4bit", g_bytes)
        t_l = time_op(lambda i: torch.nn.functional.linear(xv, xs[i]), rot, iters)
        row("gemv b1 vs bf16 linear", t_o, t_l, "F.linear bf16", g_bytes)
        row(
            "gemv b1 vs b1 CUDA cores",
            t_o,
            time_op(lambda i: gemv(i, xv, 10), qrot, iters),
            "variant 10",
            g_bytes,
        )
        x8 = torch.randn(8, in_f, device="cuda", dtype=torch.bfloat16)
        t_o8 = time_op(lambda i: gemv(i, x8), qrot, iters)
        t_l8 = time_op(lambda i: torch.nn.functional.linear(x8, xs[i]), rot, iters)
        row(
            "gemv b8 vs b8 CUDA cores",
            t_o8,
            time_op(lambda i: gemv(i, x8, 10), qrot, iters),
            "variant 10",
            g_bytes,
        )
        row("gemv b8 vs bf16 linear", t_o8, t_l8, "F.linear bf16", g_bytes + 14 * (in_f + out_f))
    # Correctness guard: the timed GEMV computes the product of the dequantized weight.
    w = kernels_cuda.dequantize_4bit(
        recs[0][0], None, n=n, blocksize=64, quant_map=qmap, out_dtype=torch.float32, nested=recs[0][1]
    )
    y = cuda_nf4.gemv(xv, recs[0], out_f, in_f)
    ref = xv.double() @ w.view(out_f, in_f).double().T
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, f"GEMV relative error {rel}"
    for held in (xs, recs, brecs, outs):
        held.clear()
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small shapes, fewer iterations")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--ops", default="quantize,dequantize,gemv", help="comma list of ops to time")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    usable, why = kernels_cuda.cuda_status()
    if not usable:
        sys.exit(f"bench_cuda.py needs the CUDA backend: {why}")
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except ImportError:
        bnb = bnbf = None
        print("bitsandbytes not installed: baseline columns empty")
    shapes = SHAPES[:2] if args.quick else SHAPES
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth(args.iters)
    print(
        f"device {props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MiB; "
        f"torch {torch.__version__}; bitsandbytes {getattr(bnb, '__version__', None)}; "
        f"copy bandwidth {bw / 1e9:.0f} GB/s (read + write)"
    )
    rows = []
    for shape in shapes:
        rows += bench_shape(shape, bw, args.iters, bnbf, bnb, tuple(args.ops.split(",")))
    if args.json:
        args.json.write_text(
            json.dumps({"device": props.name, "copy_GBps": bw / 1e9, "rows": rows}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
