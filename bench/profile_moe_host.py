"""Host time of one MoE block of ``load_quantized`` per decode token (router + 4-bit experts), on the CPU.

A small random Qwen3-MoE (hidden 256, 16 experts of 128, top-4) keeps the kernels' own work to a few
µs, so what is timed is the host side of a decode step: Python, torch dispatch, the custom op's
wrapper, the routing ops (router linear, softmax, top-k, renormalisation). Prints the calling thread's CPU
µs (``time.thread_time``: other jobs on a shared machine do not count; the kernels run inline at this
size) per block call
(best of --repeat rounds of --iters calls) for the whole block, the router alone and the experts alone,
and with ``--profile`` torch.profiler's table of one block's ops.

A/B: run it alternately with two checkouts' interpreters (each imports its own ``converter``):

    cd /tmp && for i in 1 2 3; do for v in /work/main /work/wt/x; do $v/.venv/bin/python \
        /work/wt/x/bench/profile_moe_host.py --tag $v; done; done
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch


def small_moe(work: Path) -> Path:
    """The random bf16 Qwen3-MoE and its --moe-experts quantize folder (made once, shared by checkouts)."""

    from bench_moe import random_small_moe

    q = work / "q"
    src = random_small_moe(
        work / "src", hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_experts=16,
        num_experts_per_tok=4, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, vocab_size=512,
    )  # fmt: skip
    if not (q / "config.json").exists():
        from converter.writer.pipeline import convert

        convert(src, q, moe_experts="quantize", progress=False)
    return q


def per_call_us(fn, x: torch.Tensor, iters: int, repeat: int) -> float:
    best = float("inf")
    with torch.no_grad():
        for _ in range(5):
            fn(x)
        for _ in range(repeat):
            t0 = time.thread_time()  # this thread's CPU time: robust to other jobs on the cores
            for _ in range(iters):
                fn(x)
            best = min(best, (time.thread_time() - t0) / iters)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/qm-moe-host")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--tag", default="")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from converter.loader.model import load_quantized

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_quantized(small_moe(Path(args.workdir))).eval()
    block = model.model.layers[0].mlp
    torch.manual_seed(1)
    x = torch.randn(1, 1, model.config.hidden_size, dtype=torch.bfloat16)
    flat = x.view(1, -1)
    _, w, idx = block.gate(flat)

    def experts(h: torch.Tensor) -> torch.Tensor:
        return block.experts(h, idx, w)

    row = {
        "tag": args.tag,
        "block_us": round(per_call_us(block, x, args.iters, args.repeat), 2),
        "router_us": round(per_call_us(block.gate, flat, args.iters, args.repeat), 2),
        "experts_us": round(per_call_us(experts, flat, args.iters, args.repeat), 2),
    }
    print(json.dumps(row), flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(100):
                block(x)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
