"""Per-call cost of one 4-bit linear layer's eager forward: ours vs F.linear (bf16) vs bitsandbytes.

Batch 1 (decode), bf16 activations, no autograd. On a tiny layer the kernel's own time is ~0, so the
number is the Python/dispatch overhead per call; on 4096x4096 it is what a decoder layer pays.
"ours (general path)" is the layer's functional route (``linear_4bit``: what every call paid before
the per-weight preparation), kept for comparison. On CUDA the calls are queued back to back and the
wall time per call is the host's cost whenever it exceeds the kernel's.

    cd /tmp && python /path/to/bench/bench_linear_overhead.py [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from need_cuda import require_cuda

from converter.kernels import bnb4bit as kernels
from converter.loader import ops
from converter.loader.module import Linear4bit, linear_4bit
from converter.loader.siblings import SiblingGroup
from formats.quant_types import QuantType
from formats.record import QuantizedTensor


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def per_call_us(fn, device: str, calls: int, rounds: int = 7) -> float:
    """Best over rounds of (wall time of ``calls`` back-to-back calls) / calls, in microseconds."""
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(rounds):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def ours_layer(w: torch.Tensor, nested: bool) -> Linear4bit:
    packed, absmax = kernels.quantize_4bit(w.float().contiguous(), blocksize=64, quant_type=QuantType.NF4)
    nest = kernels.quantize_nested(absmax) if nested else None
    record = QuantizedTensor.from_kernel_outputs(
        "w", tuple(w.shape), "bfloat16", QuantType.NF4, 64, packed, absmax, nested=nest
    )
    return Linear4bit.from_record(record).eval()


def bnb_layer(w: torch.Tensor, device: str):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        w.shape[1], w.shape[0], bias=False, compute_dtype=torch.bfloat16, quant_type="nf4"
    )
    layer.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4", blocksize=64)
    return layer.to(device).eval()


def bench_shape(shape: str, dev: str) -> dict:
    out_f, in_f = (int(v) for v in shape.split("x"))
    w = torch.randn(out_f, in_f) * 0.02
    x = torch.randn(1, in_f, dtype=torch.bfloat16, device=dev)
    wb = w.to(torch.bfloat16).to(dev)
    calls = 2000 if out_f * in_f <= 1 << 16 or dev == "cuda" else 200
    row: dict = {"shape": shape, "device": dev}
    with torch.no_grad():
        ours = ours_layer(w, nested=True).to(dev)
        row["ours_us"] = per_call_us(lambda: ours(x), dev, calls)
        row["ours_general_path_us"] = per_call_us(lambda: linear_4bit(x, ours.weight), dev, calls)
        # the route each eager call took before the prepared launches of loader/cuda_gemv.py (round 38)
        row["ours_prepared_route_us"] = per_call_us(
            lambda: ops.linear(x, ours._kernel_args, None), dev, calls
        )
        row["F.linear_bf16_us"] = per_call_us(lambda: F.linear(x, wb), dev, calls)
        try:
            theirs = bnb_layer(w, dev)
            row["bnb_us"] = per_call_us(lambda: theirs(x), dev, calls)
        except Exception as exc:  # bitsandbytes missing or without this device: reported, not fatal
            row["bnb_us"] = None
            row["bnb_error"] = f"{type(exc).__name__}: {exc}"[:120]
    return row


def bench_group(in_f: int, outs: list[int], dev: str) -> dict:
    """A sibling group as a decoder calls it (q/k/v, gate/up: one call per member on one x), time per
    whole group: ours (one launch), the same group through the general route (``ops.gemv_prepared_multi``,
    every eager call before round 38), one bf16 ``F.linear`` per member, one bnb layer per member.
    (Round 38's raw file names the last two ``*_x3_us`` for both groups: one call per member.)"""
    layers = [ours_layer(torch.randn(o, in_f) * 0.02, nested=True).to(dev) for o in outs]
    group = SiblingGroup(layers)
    for i, m in enumerate(layers):
        m._siblings, m._sibling_index = group, i
    x = torch.randn(1, in_f, dtype=torch.bfloat16, device=dev)
    wbs = [(torch.randn(o, in_f) * 0.02).to(torch.bfloat16).to(dev) for o in outs]
    row: dict = {"group": f"{in_f}->{'+'.join(map(str, outs))}", "device": dev}
    with torch.no_grad():
        row["ours_group_us"] = per_call_us(lambda: [m(x) for m in layers], dev, 2000)
        prepared = group._eager_group
        group._eager_group = lambda x: None
        row["ours_group_general_route_us"] = per_call_us(lambda: [m(x) for m in layers], dev, 2000)
        group._eager_group = prepared
        row["F.linear_bf16_each_us"] = per_call_us(lambda: [F.linear(x, w) for w in wbs], dev, 2000)
        try:
            theirs = [bnb_layer(torch.randn(o, in_f) * 0.02, dev) for o in outs]
            row["bnb_each_us"] = per_call_us(lambda: [m(x) for m in theirs], dev, 2000)
        except Exception as exc:  # bitsandbytes missing or without this device: reported, not fatal
            row["bnb_each_us"] = None
            row["bnb_error"] = f"{type(exc).__name__}: {exc}"[:120]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shapes", default="64x64,4096x4096")
    ap.add_argument("--groups", default="4096:4096+1024+1024,4096:14336+14336", help="in:out+out+... groups")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.device == "cuda":
        require_cuda(__file__)
    dev = args.device
    rows = []
    for shape in args.shapes.split(","):
        row = bench_shape(shape, dev)
        rows.append(row)
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    if dev == "cuda":  # sibling groups launch together on CUDA only (loader/siblings.py)
        for spec in filter(None, args.groups.split(",")):
            in_f, outs = spec.split(":")
            row = bench_group(int(in_f), [int(o) for o in outs.split("+")], dev)
            rows.append(row)
            print(
                json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}),
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
