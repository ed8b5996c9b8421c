"""The MoE decode kernels (csrc/cuda/gemv_grouped.cu) alone, at Qwen3-30B-A3B's shape, inside CUDA graphs.

    python bench/bench_moe_gemv_cuda.py [--replays 20] [--steps 16] [--json out.json]

One layer's expert buffer as the loader stacks it (128 experts, hidden 2048, expert intermediate 768,
NF4 codes, blocksize 64, float32 absmax; random codes: the time does not depend on the values), top-8
routing. A graph holds --steps launches, each with its own random routing (every step reads other
experts, so the bytes come from device memory, not from L2, as in a 48-layer model); its replay is
timed with CUDA events (median of --replays) and divided by the steps. Kernels: the first projection
with SiLU (``glu``: gate + up of the 8 routed experts), the second with the routing sum (``sum``: down),
and both (``decode_silu``, what a decode step runs per layer), each with the kernel chosen (``auto``: the
tensor-core kernels for these bf16 shapes), forced to the tensor-core kernels (``mma``), or the CUDA-core
kernels with 8 / 16 / 32 lanes per row. "% floor": the bytes a step must read (the distinct routed
experts' codes and absmax, plus activations) at the copy bandwidth measured in the same run, over the
time. Contender: bf16 ``F.linear`` over the same routed experts (gate_up, then down; no routing sum),
the dense model's cost of the same work. Reference: before this kernel, a 48-layer profile on the H200
measured 15.0 us (glu) and 8.4 us (sum) per layer at batch 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cuda_timing import copy_bandwidth, time_graph
from need_cuda import require_cuda

from converter.kernels.checks import KERNEL_DTYPE_CODES
from converter.kernels.cuda_launch import current_stream
from converter.loader import moe_cuda
from converter.loader.moe_records import region_pointers
from formats import codebooks

EXPERTS, HIDDEN, INTER, TOP_K, BS = 128, 2048, 768, 8, 64
BATCHES = (1, 4)
LANES = (0, moe_cuda.MMA_LANES, 8, 16, 32)
#: Per-layer times of the previous kernels (8 lanes per row, one chunk prefetched), 48-layer profile.
PREVIOUS_US = {"glu": 15.0, "sum": 8.4}


class Layer:
    """One layer's stacked experts (random NF4 codes, absmax in [0.01, 0.11)) and the routing of each step."""

    def __init__(self, steps: int, batch: int, seed: int):
        g = torch.Generator(device="cuda").manual_seed(seed)
        self.gu_bytes, self.gu_blocks = INTER * HIDDEN, 2 * INTER * HIDDEN // BS
        row_bytes, row_blocks = 3 * INTER * HIDDEN // 2, 3 * INTER * HIDDEN // BS
        self.packed = torch.randint(
            0, 256, (EXPERTS, row_bytes), dtype=torch.uint8, device="cuda", generator=g
        )
        self.absmax = torch.rand(EXPERTS, row_blocks, device="cuda", generator=g) * 0.1 + 0.01
        self.qmap = torch.tensor(codebooks.NF4, dtype=torch.float32, device="cuda")
        cpu = torch.Generator().manual_seed(seed)
        self.idx = [
            torch.stack([torch.randperm(EXPERTS, generator=cpu)[:TOP_K] for _ in range(batch)]).cuda()
            for _ in range(steps)
        ]
        self.x = [torch.randn(batch, HIDDEN, device="cuda", generator=g).bfloat16() for _ in range(steps)]
        self.w = [torch.rand(batch, TOP_K, device="cuda", generator=g).bfloat16() for _ in range(steps)]
        self.h = [
            torch.empty(batch * TOP_K, INTER, device="cuda", dtype=torch.bfloat16) for _ in range(steps)
        ]
        self.y = [torch.empty(batch, HIDDEN, device="cuda", dtype=torch.bfloat16) for _ in range(steps)]
        self.unique = sum(int(i.unique().numel()) for i in self.idx) / steps  # distinct experts per step

    def glu(self, s: int, lanes: int) -> None:
        x, ids, batch = self.x[s], self.idx[s].reshape(-1), self.x[s].shape[0]
        moe_cuda._ext().cuda_gemv_4bit_grouped_glu(
            x.device.index, x.data_ptr(), KERNEL_DTYPE_CODES[x.dtype], batch * TOP_K, TOP_K, INTER, HIDDEN,
            BS, ids.data_ptr(), EXPERTS, *region_pointers(self.packed, self.absmax, 0, 0),
            self.qmap.data_ptr(), self.h[s].data_ptr(), current_stream(x.device), lanes,
        )  # fmt: skip

    def sum(self, s: int, lanes: int) -> None:
        h, ids, w, batch = self.h[s], self.idx[s].reshape(-1), self.w[s].reshape(-1), self.x[s].shape[0]
        moe_cuda._ext().cuda_gemv_4bit_grouped_sum(
            h.device.index, h.data_ptr(), KERNEL_DTYPE_CODES[h.dtype], batch, TOP_K, HIDDEN, INTER, BS,
            ids.data_ptr(), EXPERTS, w.data_ptr(), KERNEL_DTYPE_CODES[w.dtype],
            *region_pointers(self.packed, self.absmax, self.gu_bytes, self.gu_blocks), self.qmap.data_ptr(),
            self.y[s].data_ptr(), current_stream(h.device), lanes,
        )  # fmt: skip

    def decode(self, s: int) -> torch.Tensor:
        return moe_cuda.decode_silu(
            self.x[s], self.idx[s], self.w[s], self.packed, self.absmax, self.qmap, INTER, BS
        )

    def floor_bytes(self, kernel: str) -> float:
        """Bytes one step must read and write: distinct experts' codes + absmax, activations (bf16)."""
        batch = self.x[0].shape[0]
        gu = 2 * INTER * HIDDEN // 2 + 4 * (2 * INTER * HIDDEN // BS)
        dn = HIDDEN * INTER // 2 + 4 * (HIDDEN * INTER // BS)
        x_b, h_b = 2 * batch * HIDDEN, 2 * batch * TOP_K * INTER
        glu, sm = self.unique * gu + x_b + h_b, self.unique * dn + h_b + x_b
        bf16 = self.unique * 2 * 3 * INTER * HIDDEN + 2 * x_b  # the dense contender's weights
        return {"glu": glu, "sum": sm, "decode_silu": glu + sm, "bf16 F.linear": bf16}[kernel]


def bf16_contender(layer: Layer, steps: int) -> Callable[[], object]:
    """F.linear over each step's routed experts in bf16 (gate_up [2I, H], then down [H, I]), batch 1."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    gate_up = torch.randn(EXPERTS, 2 * INTER, HIDDEN, device="cuda", generator=gen).bfloat16()
    down = torch.randn(EXPERTS, HIDDEN, INTER, device="cuda", generator=gen).bfloat16()
    routes = [layer.idx[s][0].tolist() for s in range(steps)]  # fixed at capture: the dense model's loop

    def run() -> None:
        for s in range(steps):
            x = layer.x[s][:1]
            for e in routes[s]:
                torch.nn.functional.linear(torch.nn.functional.linear(x, gate_up[e])[:, :INTER], down[e])

    return run


def contenders(layer: Layer, steps: int, batch: int) -> dict[tuple[str, str], Callable[[], object]]:
    """(kernel, configuration) -> the work one graph captures: ``steps`` launches."""
    out: dict[tuple[str, str], Callable[[], object]] = {}
    for lanes in LANES:
        name = "auto" if lanes == 0 else "mma" if lanes == moe_cuda.MMA_LANES else f"{lanes} lanes"
        out["glu", name] = lambda lanes=lanes: [layer.glu(s, lanes) for s in range(steps)]
        out["sum", name] = lambda lanes=lanes: [layer.sum(s, lanes) for s in range(steps)]
    out["decode_silu", "auto"] = lambda: [layer.decode(s) for s in range(steps)]
    if batch == 1:
        out["bf16 F.linear", "x8 experts"] = bf16_contender(layer, steps)
    return out


def check_configs(layer: Layer) -> None:
    """Every lane configuration computes the same h and y (float32 sums in another order)."""
    layer.glu(0, 0)
    layer.sum(0, 0)
    h0, y0 = layer.h[0].double(), layer.y[0].double()
    for lanes in LANES[1:]:
        layer.glu(0, lanes)
        layer.sum(0, lanes)
        for got, ref in ((layer.h[0], h0), (layer.y[0], y0)):
            rel = ((got.double() - ref).norm() / ref.norm()).item()
            assert rel < 1e-2, f"lanes {lanes}: relative difference {rel} from the auto configuration"


def bench_batch(batch: int, steps: int, replays: int, bw: float) -> list[dict]:
    layer = Layer(steps, batch, seed=batch)
    check_configs(layer)
    rows = []
    for (kernel, name), fn in contenders(layer, steps, batch).items():
        t = time_graph(fn, replays) / steps
        floor = layer.floor_bytes(kernel) / bw
        r = {
            "batch": batch,
            "kernel": kernel,
            "config": name,
            "us": t * 1e6,
            "floor_us": floor * 1e6,
            "fraction_of_floor": floor / t,
            "previous_us": PREVIOUS_US.get(kernel) if batch == 1 else None,
        }
        rows.append(r)
        prev = f"  previous {r['previous_us']:.1f} us" if r["previous_us"] else ""
        print(
            f"B={batch} {kernel:<13} {name:<10} {r['us']:7.2f} us  {100 * r['fraction_of_floor']:5.1f}% "
            f"of floor {r['floor_us']:5.2f} us{prev}",
            flush=True,
        )
    times = {(r["kernel"], r["config"]): r["us"] for r in rows}
    if ("bf16 F.linear", "x8 experts") in times:
        ratio = times["bf16 F.linear", "x8 experts"] / times["decode_silu", "auto"]
        print(f"B={batch} decode_silu: {ratio:.2f}x faster than bf16 F.linear over the same experts")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    require_cuda(__file__)
    if not moe_cuda.available():
        sys.exit("bench_moe_gemv_cuda.py needs the CUDA backend with the MoE kernels")
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth(args.replays, graph=True)
    print(
        f"device {props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MiB; "
        f"torch {torch.__version__}; copy bandwidth {bw / 1e9:.0f} GB/s (read + write); "
        f"{args.steps} steps per graph, median of {args.replays} replays",
        flush=True,
    )
    rows = []
    for batch in BATCHES:
        rows += bench_batch(batch, args.steps, args.replays, bw)
        torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps({"device": props.name, "copy_bw": bw, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
