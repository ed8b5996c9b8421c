"""LLM.int8 on one GPU, side by side in one run: quantize vs a copy, GEMV in a CUDA graph vs bf16 and bnb.

    cd /tmp && python /path/to/bench/bench_int8.py --device cuda [--iters 50] [--json out.json]

Quantize: a bf16 [rows, cols] weight to int8 codes + SCB (csrc/cuda/int8.cu). Its floor is its bytes
(2 read + 1 written per element, 4 per row) over the bandwidth of a 1 GiB device-to-device copy timed
in the same run; bnb's column is ``.to(float16)`` + ``int8_vectorwise_quant`` (what ``Int8Params``
runs), when bitsandbytes has its CUDA library. Inputs rotate through enough buffers to exceed twice
the L2 cache.

GEMV: ``y = x @ W.T`` with bf16 x of 1 and 8 tokens. Each contender is captured in one CUDA graph
that calls it on ``rot`` different weights in turn (more bytes than twice the L2, as in a decode step
through many layers), and the graph replay's time is divided by ``rot``: ours (the fused int8 GEMV,
csrc/cuda/gemv_int8.cu, through the ``quantize_model::gemv_int8`` op), bf16 ``F.linear`` (cuBLAS) and
bitsandbytes' ``Linear8bitLt`` forward (threshold 6), timed eagerly: GPU time between CUDA events
(its outlier split is data-dependent, so it is not captured).
At batch 1 the forced kernel configurations (rows per warp R, chunks in flight U) are timed too,
for tuning the default (R2U4).
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from cuda_timing import capture_graph, copy_bandwidth, rotation_for, time_op
from need_cuda import require_cuda

from converter.kernels import int8 as kernels_int8
from converter.kernels import int8_cuda as kernels_int8_cuda
from converter.loader import int8_ops

SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192))
BATCHES = (1, 8)
#: csrc/cuda/gemv_int8.cu's forced batch 1-2 configurations (variant -> rows per warp, chunks in flight).
VARIANTS = {1: "R1U4", 2: "R2U2", 3: "R4U2", 4: "R4U4"}


def _bnb() -> tuple[object | None, str]:
    """bitsandbytes when it imports and runs an int8 op on this GPU, else (None, why)."""
    try:
        import bitsandbytes as bnb

        torch.ops.bitsandbytes.int8_vectorwise_quant.default(
            torch.ones(2, 16, dtype=torch.float16, device="cuda"), 0.0
        )
        torch.cuda.synchronize()
    except Exception as exc:  # any failure means "no bnb column", printed with the reason
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    return bnb, ""


def _quantize_row(out_f: int, in_f: int, bw: float, iters: int, bnb: object | None) -> dict:
    n = out_f * in_f
    rot = rotation_for(3 * n)
    xs = [(torch.randn(out_f, in_f, device="cuda") * 0.02).to(torch.bfloat16) for _ in range(rot)]
    codes, scb = torch.empty(n, dtype=torch.int8, device="cuda"), torch.empty(out_f, device="cuda")
    dev = torch.cuda.current_device()

    def ours(i: int) -> None:  # the launch alone: quantize_int8 adds a host sync (its NaN/Inf check)
        kernels_int8_cuda._launch_quantize_int8(dev, xs[i], "cpu", codes, scb, None)

    def theirs(i: int) -> None:
        torch.ops.bitsandbytes.int8_vectorwise_quant.default(xs[i].to(torch.float16), 0.0)

    t_ours = time_op(ours, rot, iters)
    t_bnb = time_op(theirs, rot, iters) if bnb is not None else None
    floor = (3 * n + 4 * out_f) / bw
    return {
        "op": "quantize",
        "shape": f"{out_f}x{in_f}",
        "ours_us": t_ours * 1e6,
        "gparams": n / t_ours / 1e9,
        "fraction_of_floor": floor / t_ours,
        "bnb_us": None if t_bnb is None else t_bnb * 1e6,
    }


def bench_quantize(bw: float, iters: int, bnb: object | None) -> list[dict]:
    print("\nquantize bf16 -> int8 codes + SCB (floor: bytes / same-run copy bandwidth)")
    print(f"{'shape':>12} {'ours us':>9} {'Gparam/s':>9} {'of floor':>9} {'bnb us':>9} {'bnb/ours':>9}")
    rows = []
    for out_f, in_f in SHAPES:
        r = _quantize_row(out_f, in_f, bw, iters, bnb)
        rows.append(r)
        t_bnb = r["bnb_us"]
        bnb_cols = f"{'n/a':>9}" if t_bnb is None else f"{t_bnb:9.1f} {t_bnb / r['ours_us']:8.2f}x"
        print(
            f"{r['shape']:>12} {r['ours_us']:9.1f} {r['gparams']:9.0f} "
            f"{100 * r['fraction_of_floor']:8.0f}% {bnb_cols}",
            flush=True,
        )
        torch.cuda.empty_cache()
    return rows


def _graph_time(calls: list[Callable[[], object]], iters: int) -> float:
    """Seconds per call: all calls captured in one CUDA graph, replay timed, divided by len(calls)."""

    def launch() -> None:
        for c in calls:
            c()

    graph = capture_graph(launch)
    return time_op(lambda _i: graph.replay(), 1, iters) / len(calls)


def _bnb_layer(bnb, codes: torch.Tensor, scb: torch.Tensor) -> torch.nn.Module:
    out_f, in_f = codes.shape
    layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=False, has_fp16_weights=False, threshold=6.0)
    layer.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scb)
    layer.state.CB, layer.state.SCB = codes, scb
    return layer.eval()


def _gemv_rows(out_f: int, in_f: int, bw: float, iters: int, bnb: object | None) -> list[dict]:
    rot = rotation_for(out_f * in_f)  # the int8 weight's bytes
    rot16 = rotation_for(2 * out_f * in_f)
    ws = [(torch.randn(out_f, in_f, device="cuda") * 0.02).to(torch.bfloat16) for _ in range(rot16)]
    recs = [kernels_int8.quantize_int8(ws[i % rot16]) for i in range(rot)]
    layers = [_bnb_layer(bnb, c, s) for c, s in recs] if bnb is not None else []
    rows = []
    for b in BATCHES:
        x = torch.randn(b, in_f, device="cuda").to(torch.bfloat16)
        assert int8_ops.gemv_ok(x)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_ours = _graph_time([lambda c=c, s=s, x=x: int8_ops.gemv(x, c, s) for c, s in recs], iters)
            t_bf16 = _graph_time([lambda w=w, x=x: F.linear(x, w) for w in ws], iters)
            # bnb eagerly (its outlier split is data-dependent): GPU time between CUDA events with the
            # host queueing ahead (time_op), which a graph replay approximates
            t_bnb = time_op(lambda i, x=x: layers[i](x), len(layers), iters) if layers else None
            variants = {}
            if b == 1:  # the forced batch 1-2 configurations (rows per warp R, chunks in flight U)
                for v in VARIANTS:
                    calls = [
                        lambda c=c, s=s, x=x, v=v: kernels_int8_cuda.gemv_int8(x, c, s, variant=v)
                        for c, s in recs
                    ]
                    variants[VARIANTS[v]] = _graph_time(calls, iters) * 1e6
        floor = (out_f * in_f + 4 * out_f) / bw
        rows.append(
            {
                "op": f"gemv B={b}",
                "shape": f"{out_f}x{in_f}",
                "ours_us": t_ours * 1e6,
                "fraction_of_floor": floor / t_ours,
                "bf16_us": t_bf16 * 1e6,
                "bf16_over_ours": t_bf16 / t_ours,
                "bnb_us": None if t_bnb is None else t_bnb * 1e6,
                "variants_us": variants,
            }
        )
    return rows


def bench_gemv(bw: float, iters: int, bnb: object | None) -> list[dict]:
    print("\nGEMV y = x @ W.T, bf16 x, microseconds per layer inside a CUDA graph (weights rotate past L2)")
    print(
        f"{'shape':>12} {'B':>6} {'ours int8':>10} {'of floor':>9} {'bf16 linear':>12} {'bnb eager':>10} "
        f"{'bf16/ours':>10} {'bnb/ours':>9}"
    )
    rows = []
    for out_f, in_f in SHAPES:
        for r in _gemv_rows(out_f, in_f, bw, iters, bnb):
            rows.append(r)
            t_bnb = r["bnb_us"]
            bnb_cols = f"{'n/a':>10}" if t_bnb is None else f"{t_bnb:10.2f}"
            ratio = "" if t_bnb is None else f"{t_bnb / r['ours_us']:8.2f}x"
            print(
                f"{r['shape']:>12} {r['op'][5:]:>6} {r['ours_us']:10.2f} "
                f"{100 * r['fraction_of_floor']:8.0f}% {r['bf16_us']:12.2f} {bnb_cols} "
                f"{r['bf16_over_ours']:9.2f}x {ratio}",
                flush=True,
            )
            if r["variants_us"]:
                forced = ", ".join(f"{k} {t:.2f}" for k, t in r["variants_us"].items())
                print(f"{'':>12} {'':>6} default R2U4; forced: {forced} us", flush=True)
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args(argv)
    require_cuda(__file__)
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth(args.iters)
    bnb, why = _bnb()
    print(f"{props.name}, torch {torch.__version__}, copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    if bnb is None:
        print(f"bitsandbytes CUDA column: n/a ({why})")
    rows = bench_quantize(bw, args.iters, bnb) + bench_gemv(bw, args.iters, bnb)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": props.name, "copy_bytes_per_s": bw, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
