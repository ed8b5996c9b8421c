"""Where the CUDA load warm-up's time goes (``converter/loader/warmup.py``), each variant in a fresh process.

The 8B load's warm-up thread (``warm_ops``) took 0.88 s on an H100 beside the load's readers, of
which cuBLAS, SDPA and the head were 0.34 s: the rest is the first calls of element-wise kernels.
This probe separates what those first calls cost alone (``ops``: per op, synchronised), whether they
can overlap (``split2``/``split4``: the op families on 2 or 4 threads), what GIL-busy threads beside
them add (``busy_*``: 8 threads running short Python bursts between GIL-releasing sleeps, as the
readers do) and which kernels a first forward still meets cold after the warm-up (``firstfwd``: one
Llama-3.1-8B-shaped decoder layer in bf16).

    python3 bench/probe_warmup.py [--variants seq,ops,split2,...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

from need_cuda import require_cuda

CONFIG = {  # Llama-3.1-8B's widths
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rms_norm_eps": 1e-5,
    "vocab_size": 128256,
    "hidden_act": "silu",
    "intermediate_size": 14336,
}
VARIANTS = ("seq", "ops", "split2", "split4", "busy_seq", "busy_split2", "busy_split4", "firstfwd")


def families(device: Any) -> dict[str, Any]:
    """``_forward_ops``'s work cut into families that can run on separate threads."""
    import torch
    import torch.nn.functional as F

    from converter.loader.warmup import _forward_ops

    bf16 = torch.bfloat16

    def blas() -> None:
        for tokens in (4, 1):
            inv = torch.ones(64, dtype=torch.float32, device=device)
            pos = torch.arange(tokens, device=device)[None]
            (inv[None, :, None].expand(1, -1, 1) @ pos[:, None, :].float()).transpose(1, 2)

    def head() -> None:
        w = torch.empty(16384, 4096, dtype=bf16, device=device)
        for tokens in (4, 1):
            F.linear(torch.empty(1, tokens, 4096, dtype=bf16, device=device), w).float()[:, -1].argmax(-1)

    def sdpa() -> None:
        for tokens in (4, 1):
            q = torch.empty(1, 32, tokens, 128, dtype=bf16, device=device)
            k = torch.empty(1, 8, tokens, 128, dtype=bf16, device=device)
            F.scaled_dot_product_attention(q, k, k, is_causal=tokens > 1, scale=128**-0.5, enable_gqa=True)

    def everything() -> None:
        _forward_ops(CONFIG, bf16, device)

    return {"blas": blas, "head": head, "sdpa": sdpa, "all": everything}


def busy_threads(stop: threading.Event, count: int = 8) -> list[threading.Thread]:
    def work() -> None:
        while not stop.is_set():
            d = {}
            for i in range(300):  # ~30-60 us of Python under the GIL
                d[i] = i * 2
            time.sleep(0.0002)  # releases the GIL, as a read does

    threads = [threading.Thread(target=work, daemon=True) for _ in range(count)]
    for t in threads:
        t.start()
    return threads


def run_variant(name: str) -> dict[str, Any]:
    t_import = time.perf_counter()
    import torch

    from converter.loader import gil

    out: dict[str, Any] = {"variant": name, "import_s": round(time.perf_counter() - t_import, 3)}
    device = torch.device("cuda")
    t0 = time.perf_counter()
    torch.empty(0, device=device)
    torch.cuda.synchronize()
    out["context_s"] = round(time.perf_counter() - t0, 3)
    fam = families(device)
    stop = threading.Event()
    with gil.short_switch_interval():
        if name.startswith("busy_"):
            busy_threads(stop)
            name = name.removeprefix("busy_")
        t0 = time.perf_counter()
        with torch.no_grad():
            if name == "seq":
                fam["all"]()
            elif name == "ops":
                out["ops"] = per_op(fam["all"])
            elif name in ("split2", "split4"):
                groups = (
                    [["blas", "head", "sdpa"], ["all"]]
                    if name == "split2"
                    else [["blas"], ["head"], ["sdpa"], ["all"]]
                )
                threads = [
                    threading.Thread(target=lambda g=g: [fam[f]() for f in g], daemon=True) for g in groups
                ]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            elif name == "firstfwd":
                fam["all"]()
                torch.cuda.synchronize()
                out["warm_s"] = round(time.perf_counter() - t0, 3)
                out.update(first_forward(device))
            torch.cuda.synchronize()
        out["wall_s"] = round(time.perf_counter() - t0, 3)
        stop.set()
    return out


def per_op(fn: Any) -> list[tuple[str, float]]:
    """Each aten op ``fn`` calls, synchronised, with its wall time (ms), slowest first."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    times: list[tuple[str, float]] = []

    class Timed(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            start = time.perf_counter()
            result = func(*args, **(kwargs or {}))
            torch.cuda.synchronize()
            times.append((str(func), round((time.perf_counter() - start) * 1e3, 2)))
            return result

    with Timed():
        fn()
    return sorted(times, key=lambda t: -t[1])


def first_forward(device: Any) -> dict[str, Any]:
    """One 8B-shaped Llama decoder layer (bf16): its first and second forward at 16 tokens and a decode
    step, the first one per op (what the warm-up left cold)."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_hidden_layers=1,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    torch.cuda.synchronize()
    ids = torch.zeros(1, 16, dtype=torch.long, device=device)
    result: dict[str, Any] = {}
    t0 = time.perf_counter()
    result["first_ops"] = [op for op in per_op(lambda: model(ids)) if op[1] > 0.5][:30]
    result["first_fwd_timed_s"] = round(time.perf_counter() - t0, 3)
    for label in ("second", "third"):
        t0 = time.perf_counter()
        model(ids)
        torch.cuda.synchronize()
        result[f"{label}_fwd_s"] = round(time.perf_counter() - t0, 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--variant", help="run one variant in this process (internal)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    require_cuda(__file__)
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args.variant)))
        return
    results = []
    for name in args.variants.split(","):
        for _ in range(args.repeat if name != "ops" and name != "firstfwd" else 1):
            proc = subprocess.run(
                [sys.executable, __file__, "--variant", name],
                capture_output=True,
                text=True,
                timeout=300,
                env=os.environ.copy(),
            )
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if not lines:
                print(name, "failed:", proc.stderr[-1500:])
                continue
            result = json.loads(lines[-1][7:])
            results.append(result)
            short = {k: v for k, v in result.items() if k not in ("ops", "first_ops")}
            print(json.dumps(short))
            for key in ("ops", "first_ops"):
                if key in result:
                    print(f"  {key}: total {sum(t for _, t in result[key]):.1f} ms over {len(result[key])}")
                    for op, ms in result[key][:25]:
                        print(f"    {ms:8.2f} ms  {op}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
