"""Interleaved A/B of the CPU decode changes in ``generate()`` (SmolLM2-135M, batch 1, greedy).

Contenders, each timed once per round, rounds interleaved, best of ``--rounds`` (for a shared VM):

- ``ours_new``: ``load_quantized`` as shipped (GEMV threads from ``converter.kernels.cpu_threads``, the plain
  lm_head's prompt-step input re-strided by ``converter.loader.head``);
- ``ours_before``: the same model object with the pool for every GEMV and no head hook (the old code);
- ``ours_policy_nohook``: the thread policy alone (no head hook);
- ``bf16_eager`` / ``bf16_compiled``: the plain checkpoint, dynamic cache / static cache with the decode
  step through ``torch.compile`` (inductor), as in ``bench_generate.py``.

``decode_tok_s`` = (new - 1) / (t(new tokens) - t(1 token)), ``ttft_s`` = t(1 token), as bench_generate.

    cd /tmp && python /path/to/bench/bench_cpu_decode_ab.py --rounds 8 --json out.json
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
import bench_generate as bg

from converter.kernels import custom_ops
from converter.loader import head as qhead
from converter.tools import samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--workdir", default="/tmp/qm_bench_generate")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    plain = samples.smollm2(Path(os.environ.get("QM_SAMPLES_DIR", samples.DEFAULT_SAMPLES_DIR)))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    nf4 = bg.nf4_folder(plain, work / f"{plain.name}-nf4", "cpu")
    torch.manual_seed(0)
    ids = torch.randint(100, 10000, (1, args.prompt))

    ours = bg.load("ours", plain, nf4, "cpu")
    head = ours.get_output_embeddings()
    head._forward_pre_hooks.clear()  # the loader's hook, switched per contender below
    hook_on = {"on": True}
    head.register_forward_pre_hook(lambda m, a: qhead._standard_strides(m, a) if hook_on["on"] else None)
    bf16 = bg.load("bf16", plain, nf4, "cpu")
    bf16c = bg.load("bf16", plain, nf4, "cpu")
    bg.compile_decode(bf16c, "cpu", fullgraph=False)
    policy = custom_ops.gemv_threads
    contenders = {  # model, static cache, GEMV thread policy, head hook
        "ours_new": (ours, False, policy, True),
        "ours_before": (ours, False, lambda n: 0, False),
        "ours_policy_nohook": (ours, False, policy, False),
        "bf16_eager": (bf16, False, policy, False),
        "bf16_compiled": (bf16c, True, policy, False),
    }

    def run(name: str, new: int) -> float:
        model, static, threads, hook = contenders[name]
        custom_ops.gemv_threads = threads
        hook_on["on"] = hook
        return bg.time_generate(model, ids, new, static, "cpu")

    for name in contenders:  # warm-up at the timed lengths (a static cache's length is compiled in)
        run(name, args.new)
        run(name, 1)
    best = {name: [float("inf"), float("inf")] for name in contenders}
    for r in range(args.rounds):
        for name in contenders:
            best[name][0] = min(best[name][0], run(name, 1))
            best[name][1] = min(best[name][1], run(name, args.new))
        bg.log(
            f"round {r}: " + ", ".join(f"{k} {(args.new - 1) / (b - a):.1f}" for k, (a, b) in best.items())
        )
    result = {
        "machine": f"cpu x{torch.get_num_threads()} torch threads",
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", ""),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rounds": args.rounds,
        "prompt": args.prompt,
        "new": args.new,
        "results": {
            k: {"decode_tok_s": round((args.new - 1) / (b - a), 2), "ttft_s": round(a, 4)}
            for k, (a, b) in best.items()
        },
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
