"""Several projections of one x in one launch vs one launch each, inside CUDA graphs (batch 1 and 4).

    python bench/bench_gemv_multi_cuda.py [--replays 20] [--json out.json]

Groups: Llama-3.1-8B attention q/k/v (4096, 1024, 1024) x 4096 and MLP gate/up 2 x 14336 x 4096,
Qwen3-30B-A3B attention q/k/v (4096, 512, 512) x 2048, and single 8192x8192 and 28672x8192 weights
(``--groups`` picks some by name). For each group, L layers of distinct random
weights (their 4-bit bytes at least 3x the L2 cache, L >= 8) are launched back to back and captured in
one CUDA graph; the replay is timed with CUDA events (median of --replays) and divided by L.
Contenders: ``fused`` (cuda_gemv_4bit_multi: one launch per group), ``separate`` (one gemv_4bit launch
per weight, the default kernel), bf16 ``F.linear`` per weight and on the concatenated weight (cuBLAS);
with ``--variants 14,15``, ``fused vN`` too: the fused launch with the stream kernel's plan forced
(csrc/cuda/gemv_stream.cu ``plan``: 12..15 split 1/2/4/8 with 8/split row tiles per CTA, 16..18 K slices).
"% floor": the group's memory floor (4-bit codes + nested absmax codes and nested absmax + x, read once)
over the time, with the bandwidth of a device-to-device copy measured in the same run (read + write).
NF4, blocksize 64, nested absmax, bf16 activations.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cuda_nf4
from cuda_timing import copy_bandwidth, time_graph

from converter.kernels import bnb4bit_cuda as kernels_cuda

#: name -> (out_features of each weight, in_features)
GROUPS = {
    "llama8b q/k/v": ((4096, 1024, 1024), 4096),
    "llama8b gate/up": ((14336, 14336), 4096),
    "qwen3-30b-a3b q/k/v": ((4096, 512, 512), 2048),
    # one weight: the launch is the plain stream kernel, so ``--variants`` tries its plans there too
    "8192x8192": ((8192,), 8192),
    "28672x8192": ((28672,), 8192),
}
BATCHES = (1, 4)


def _gemv_weight(record: cuda_nf4.Record, out_f: int) -> kernels_cuda.GemvWeight:
    packed, nested = record
    qmap = cuda_nf4.tables(packed.device)[0]
    return kernels_cuda.GemvWeight(packed, None, kernels_cuda.NestedAbsmax(*nested), qmap, out_f)


def bench_group(
    name: str,
    outs: tuple[int, ...],
    in_f: int,
    bw: float,
    replays: int,
    l2: int,
    variants: tuple[int, ...] = (),
) -> list[dict]:
    q_bytes = sum(o * in_f // 2 + o * in_f // 64 + 4 * (o * in_f // 64 // 256) for o in outs)
    layers = max(8, -(-3 * l2 // q_bytes))
    records, dense, cat = [], [], []
    for _ in range(layers):
        ws = [torch.randn(o, in_f, device="cuda", dtype=torch.bfloat16) * 0.02 for o in outs]
        records.append([_gemv_weight(cuda_nf4.quantize(w), o) for w, o in zip(ws, outs, strict=True)])
        dense.append(ws)
        cat.append(torch.cat(ws))
    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, in_f, device="cuda", dtype=torch.bfloat16)
        floor_s = (q_bytes + 2 * batch * in_f) / bw

        def fused(x=x, variant: int = 0) -> None:
            for gws in records:
                kernels_cuda._launch_gemv_4bit_multi(x, gws, in_f, cuda_nf4.BLOCKSIZE, variant=variant)

        def separate(x=x) -> None:
            for gws in records:
                for g in gws:
                    kernels_cuda._launch_gemv_4bit(
                        x, g.packed, None, g.out_features, in_f, cuda_nf4.BLOCKSIZE, g.quant_map, g.nested
                    )

        contenders = {
            "fused": fused,
            "separate": separate,
            "bf16 F.linear each": lambda x=x: [torch.nn.functional.linear(x, w) for ws in dense for w in ws],
            "bf16 F.linear cat": lambda x=x: [torch.nn.functional.linear(x, w) for w in cat],
            **{f"fused v{v}": lambda x=x, v=v: fused(x, v) for v in variants},
        }
        times = {n: time_graph(fn, replays) / layers for n, fn in contenders.items()}
        for kernel, t in times.items():
            r = {
                "group": name,
                "batch": batch,
                "kernel": kernel,
                "layers": layers,
                "us": t * 1e6,
                "floor_us": floor_s * 1e6,
                "fraction_of_floor": floor_s / t,
                "vs_separate": times["separate"] / t,
            }
            rows.append(r)
            print(
                f"{name:>20} B={batch} {kernel:<19} {r['us']:7.1f} us  "
                f"{100 * r['fraction_of_floor']:5.1f}% of floor {r['floor_us']:5.1f} us  "
                f"{r['vs_separate']:5.2f}x separate",
                flush=True,
            )
    # Guard: fused and separate compute the same products (each within bf16-class error of the other).
    x = torch.randn(1, in_f, device="cuda", dtype=torch.bfloat16)
    gws = records[0]
    for g, y in zip(gws, kernels_cuda._launch_gemv_4bit_multi(x, gws, in_f, cuda_nf4.BLOCKSIZE), strict=True):
        y1 = kernels_cuda._launch_gemv_4bit(
            x, g.packed, None, g.out_features, in_f, cuda_nf4.BLOCKSIZE, g.quant_map, g.nested
        ).double()
        rel = ((y.double() - y1).norm() / y1.norm()).item()
        assert rel < 1e-2, f"fused vs separate relative difference {rel} in {name}"
    for held in (records, dense, cat):
        held.clear()
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--variants", default="", help="forced plans of the fused launch, e.g. 13,14,15")
    parser.add_argument("--groups", default="", help="comma-separated group names (default: all)")
    args = parser.parse_args()
    variants = tuple(int(v) for v in args.variants.split(",") if v)
    usable, why = kernels_cuda.cuda_status()
    if not usable:
        sys.exit(f"bench_gemv_multi_cuda.py needs the CUDA backend: {why}")
    props = torch.cuda.get_device_properties(0)
    t0 = time.perf_counter()
    bw = copy_bandwidth(args.replays, graph=True)
    print(
        f"device {props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MiB; "
        f"torch {torch.__version__}; copy bandwidth {bw / 1e9:.0f} GB/s (read + write), graph replays, "
        f"median of {args.replays}"
    )
    rows = []
    wanted = [g for g in args.groups.split(",") if g] or list(GROUPS)
    for name in wanted:
        outs, in_f = GROUPS[name]
        rows += bench_group(name, outs, in_f, bw, args.replays, props.L2_cache_size, variants)
    print(f"total {time.perf_counter() - t0:.1f} s")
    if args.json:
        args.json.write_text(
            json.dumps({"device": props.name, "copy_GBps": bw / 1e9, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
