"""Where the second core goes in CPU decode: GEMV launches on the calling thread, our pool, torch's team.

Two parts, both with 2 torch threads (OpenMP workers spinning between ops, as in decode), on the 4-bit
layer shapes of SmolLM2-135M (NF4, blocksize 64, nested absmax, bf16 x, batch 1) and its 49152 x 576
bf16 head:

- ``launch``: µs per layer call (module call included, a small torch op between calls as in decode),
  each of ``threads`` = 1 (calling thread), 2 (our pool), -2 (torch's OpenMP team), rounds
  interleaved, best of ``--rounds``;
- ``step``: one eager decode step of the real model (hand loop, dynamic cache), split into the 4-bit
  GEMV launches, the head launch and the rest (transformers' Python and torch's small ops), with
  every launch on the calling thread vs as shipped (``converter.kernels.cpu_threads``).

    cd /tmp && python /path/to/bench/bench_cpu_team.py --rounds 7
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # loader_helpers' own imports
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "loader"))
import bench_generate as bg
from loader_helpers import make_layer

from converter import _kernels
from converter.kernels import cpu_threads
from converter.kernels import gemv_bf16 as gemv_bf16_module
from converter.loader import cpu_gemv
from converter.tools import samples

SHAPES = [(192, 576), (576, 576), (1536, 576), (576, 1536)]  # k/v, q/o, gate/up, down
MODES = {"caller": 1, "pool": 2, "team": -2}


def launches(rounds: int) -> dict[str, dict[str, float]]:
    layers = {s: make_layer(*s, blocksize=64, quant_type="nf4", nested=True)[0] for s in SHAPES}
    xs = {s: torch.randn(1, s[1]).to(torch.bfloat16) for s in SHAPES}
    head = torch.randn(49152, 576).to(torch.bfloat16)
    xh = torch.randn(1, 576).to(torch.bfloat16)
    best: dict[str, dict[str, float]] = {}
    for _ in range(rounds):
        for mode, threads in MODES.items():
            cpu_gemv.gemv_threads = lambda n, t=threads: t
            for s in SHAPES:
                layer, x, a = layers[s], xs[s], torch.randn(64)
                t0 = time.perf_counter()
                for _ in range(200):
                    layer(x)
                    a = a * 1.0001
                us = (time.perf_counter() - t0) / 200 * 1e6
                key = f"{s[0]}x{s[1]}"
                row = best.setdefault(key, {})
                row[mode] = min(row.get(mode, 1e18), us)
            t0 = time.perf_counter()
            for _ in range(20):
                gemv_bf16_module.gemv_bf16(xh, head, threads=threads)
            us = (time.perf_counter() - t0) / 20 * 1e6
            row = best.setdefault("head 49152x576", {})
            row[mode] = min(row.get(mode, 1e18), us)
    cpu_gemv.gemv_threads = cpu_threads.gemv_threads
    return best


class _Timed:
    """Stands in for the extension module in cpu_gemv / gemv_bf16: times the two GEMV entry points."""

    def __init__(self) -> None:
        self.s = {"gemv_4bit": 0.0, "gemv_bf16": 0.0}

    def __getattr__(self, name: str):
        fn = getattr(_kernels, name)
        if name not in self.s:
            return fn

        def timed(*args):
            t0 = time.perf_counter()
            fn(*args)
            self.s[name] += time.perf_counter() - t0

        return timed


def step_split(rounds: int, steps: int = 40) -> dict[str, dict[str, float]]:
    from transformers import DynamicCache

    plain = samples.smollm2(Path(os.environ.get("QM_SAMPLES_DIR", samples.DEFAULT_SAMPLES_DIR)))
    nf4 = bg.nf4_folder(plain, Path("/tmp/qm_bench_generate") / f"{plain.name}-nf4", "cpu")
    model = bg.load("ours", plain, nf4, "cpu")
    ids = torch.randint(100, 10000, (1, 64), generator=torch.Generator().manual_seed(0))
    timed = _Timed()
    cpu_gemv._kernels = gemv_bf16_module._kernels = timed
    policies = {"caller": lambda n: 1, "shipped": cpu_threads.gemv_threads}
    best: dict[str, dict[str, float]] = {}
    try:
        for _ in range(rounds):
            for name, policy in policies.items():
                cpu_gemv.gemv_threads = gemv_bf16_module.gemv_threads = policy
                with torch.no_grad():
                    cache = DynamicCache(config=model.config)
                    out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
                    tok = out.logits[:, -1].argmax(-1, keepdim=True)
                    timed.s = dict.fromkeys(timed.s, 0.0)
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        tok = model(tok, cache=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
                    total = (time.perf_counter() - t0) / steps * 1e3
                g4, head = (timed.s[k] / steps * 1e3 for k in ("gemv_4bit", "gemv_bf16"))
                row = {"step_ms": total, "gemv_4bit_ms": g4, "head_ms": head, "rest_ms": total - g4 - head}
                if row["step_ms"] < best.get(name, {"step_ms": 1e18})["step_ms"]:
                    best[name] = row
    finally:
        cpu_gemv._kernels = gemv_bf16_module._kernels = _kernels
        cpu_gemv.gemv_threads = gemv_bf16_module.gemv_threads = cpu_threads.gemv_threads
    return {k: {m: round(v, 2) for m, v in row.items()} for k, row in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "omp_team_available": _kernels.omp_team_available(),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "launch_us": {
            k: {m: round(v, 1) for m, v in row.items()} for k, row in launches(args.rounds).items()
        },
        "step": step_split(args.rounds),
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
