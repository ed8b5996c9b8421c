"""One Llama 4 MoE layer's 16-bit experts (a ``--moe-experts keep`` folder), one decode step: the routed
forward (``converter.loader.moe_llama4.route_sequential``) vs transformers' dense
``SequentialLlama4TextExperts`` loop on the same module and input, bf16 and float32, best of 3 x 10 calls.

    cd /tmp && python /path/to/bench/bench_llama4.py --moe-experts keep --only ours   # makes the folder
    cd /tmp && python /path/to/bench/bench_llama4_keep_layer.py /tmp/llama4-bench/llama4-small-6l-nf4-keep

The input is the layer's real ``routed_in`` of a one-token step after a 4-token prompt (every expert's
block, zero where the token was not routed), captured with a forward pre-hook.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch


def _best_ms(fn, x: torch.Tensor) -> float:
    fn(x)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(10):
            fn(x)
        best = min(best, (time.perf_counter() - t) / 10 * 1e3)
    return best


def _layer_ms(folder: str, dtype: torch.dtype) -> tuple[float, float]:
    """(routed, dense) milliseconds of layer 0's experts on its one-token-step input."""
    from converter.loader.model import load_quantized

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_quantized(folder, dtype=dtype).eval()
    experts = model.model.layers[0].feed_forward.experts
    seen: dict[str, torch.Tensor] = {}
    experts.register_forward_pre_hook(lambda mod, a: seen.update(x=a[0].clone()))
    with torch.no_grad():
        model(torch.tensor([[1, 5, 9, 33]]))
        model(torch.tensor([[7]]))
        routed = _best_ms(experts.forward, seen["x"])
        dense = _best_ms(lambda h: type(experts).forward(experts, h), seen["x"])
    return routed, dense


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not (Path(args.folder) / "config.json").is_file():
        ap.error(
            f"{args.folder}: no converted folder there; make it first with "
            "bench_llama4.py --moe-experts keep --only ours (its --workdir, default /tmp/llama4-bench)"
        )
    torch.set_num_threads(args.threads)
    print(f"{platform.machine()} CPU x{args.threads}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print("| dtype | routed (ms) | dense (ms) | dense / routed |")
    print("|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        routed, dense = _layer_ms(args.folder, dtype)
        print(f"| {str(dtype).removeprefix('torch.')} | {routed:.3f} | {dense:.3f} | {dense / routed:.1f}x |")


if __name__ == "__main__":
    main()
