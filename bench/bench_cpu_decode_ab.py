"""Interleaved A/B of the CPU decode path in ``generate()`` (SmolLM2-135M, batch 1, greedy).

Contenders, each timed once per round, rounds interleaved, best of ``--rounds`` (for a shared VM):

- ``ours``: ``load_quantized`` as shipped (4-bit GEMV thread policy of ``converter.kernels.cpu_threads``,
  the plain bf16 lm_head through our bf16 GEMV, ``converter.loader.head.GemvHead``);
- ``ours_caller``: the same, every GEMV (4-bit and head) on the calling thread alone (the policy before
  launches could run on torch's OpenMP team);
- ``ours_torch_head``: the same model object with the head on torch's ``F.linear`` (the i12b code);
- ``ours_head_pool``: our head GEMV on the kernel pool's threads instead of the calling thread alone;
- ``ours_loop``: ours, but a hand-written greedy loop (forward, argmax, cache) instead of
  ``generate()``: the difference per token is ``generate()``'s own per-step host work;
- ``ours_graphed``: ours through ``generate(custom_generate=converter.loader.decode.graphed_greedy)``
  (on CPU: its device-side loop without graphs, on its own static cache);
- ``ours_graphed_compiled``: the same with ``compile_step=True`` (the decode step through inductor, our
  GEMVs as custom-op nodes between its fused kernels), on one static cache;
- ``ours_compiled``: a second ours model, static cache and the decode step through ``torch.compile``
  (fullgraph), as ``bf16_compiled``;
- ``bf16_eager`` / ``bf16_compiled``: the plain checkpoint, dynamic cache / static cache with the decode
  step through ``torch.compile`` (inductor), as in ``bench_generate.py``.

``decode_tok_s`` = (new - 1) / (t(new tokens) - t(1 token)), ``ttft_s`` = t(1 token), as bench_generate.
``--only a,b``: time those contenders alone (the compiled bf16 model's warm-up is minutes on 2 cores).
``--clock cpu``: one torch thread, every contender timed in the main thread's CPU time (all of the
work runs there: torch with one thread, and every GEMV of ours, 4-bit and head, on the calling thread:
the shipped policy would send the 56 MB head to the pool, whose threads that clock does not see; so
``ours_caller`` equals ``ours`` there and ``ours_head_pool`` is not run), which other jobs on a
shared machine disturb far less than the wall clock; ``--clock wall`` (default): ``--threads`` torch
threads (default 2, the machine of docs/benchmarks.md), the shipped thread policy.
The load average at the start and the end is printed: label the numbers with it.

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

from converter.kernels import cpu_threads
from converter.kernels import gemv_bf16 as gemv_bf16_module
from converter.kernels.isa_env import running_isa
from converter.loader import cpu_gemv
from converter.loader.head import GemvHead
from converter.tools import samples


def time_loop(model, ids: torch.Tensor, new: int) -> float:
    """Seconds for ``new`` greedy tokens from a plain forward loop (what generate() does, minus its
    logits processors, stopping criteria and input preparation)."""
    from transformers import DynamicCache

    t0 = _clock()
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(new - 1):
            tok = model(tok, cache=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    return _clock() - t0


_clock = time.perf_counter

#: The contenders whose decode step goes through torch.compile.
COMPILED = ("ours_graphed_compiled", "ours_compiled", "bf16_compiled")


def thread_policies(clock: str) -> tuple:
    """(ours' GEMV thread policy, the calling thread alone's) for ``clock``: with ``cpu`` (the main
    thread's CPU time) every launch stays on the calling thread, or the work the policy hands to the
    pool's threads (the head, any launch of 1 MB of codes or more) would not be timed."""
    caller = lambda n: 1  # noqa: E731
    return (caller if clock == "cpu" else cpu_threads.gemv_threads), caller


def _cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo): the ratios differ between vendors and instruction sets."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--workdir", default="/tmp/qm_bench_generate")
    ap.add_argument("--json", default=None)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--only", default=None, help="comma-separated contender names (default: all)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for --clock wall (cpu: 1)")
    args = ap.parse_args()
    global _clock
    _clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(1 if args.clock == "cpu" else args.threads)
    only = set(args.only.split(",")) if args.only else None
    compiled = [k for k in COMPILED if only is None or k in only]
    if compiled:  # before any model is loaded or compiled
        bg.require_dynamo(f"bench_cpu_decode_ab.py's {', '.join(compiled)}")
    load_start = os.getloadavg()
    isa = running_isa()  # the path our kernels run (QM_CPU_ISA, else the best)
    bg.log(f"clock={args.clock} threads={torch.get_num_threads()} isa={isa} cpu={_cpu_model()}")
    plain = samples.smollm2(Path(os.environ.get("QM_SAMPLES_DIR", samples.DEFAULT_SAMPLES_DIR)))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    nf4 = bg.nf4_folder(plain, work / f"{plain.name}-nf4", "cpu")
    torch.manual_seed(0)
    ids = torch.randint(100, 10000, (1, args.prompt))

    ours = bg.load("ours", plain, nf4, "cpu")
    head = ours.get_output_embeddings()
    assert isinstance(head, GemvHead), type(head)
    wanted = lambda *names: only is None or bool(only & set(names))  # noqa: E731
    bf16 = bg.load("bf16", plain, nf4, "cpu") if wanted("bf16_eager") else None
    bf16c, static = None, None
    if wanted("bf16_compiled"):
        bf16c = bg.load("bf16", plain, nf4, "cpu")
        bg.compile_decode(bf16c, "cpu", fullgraph=False)
        static = bg.static_cache(bf16c, args.prompt + args.new + 1)  # one cache: the compiled step is reused
    length = args.prompt + args.new + 1
    ours_static = bg.static_cache(ours, length) if wanted("ours_graphed_compiled") else None
    oursc, oursc_static = None, None
    if wanted("ours_compiled"):
        oursc = bg.load("ours", plain, nf4, "cpu")
        bg.compile_decode(oursc, "cpu", fullgraph=True)
        oursc_static = bg.static_cache(oursc, args.prompt + args.new + 1)
    policy, caller = thread_policies(args.clock)
    contenders = {  # model, static cache (None: dynamic), head on our GEMV, threads of (head, 4-bit), loop
        "ours": (ours, None, True, (policy, policy), "eager"),
        "ours_caller": (ours, None, True, (caller, caller), "eager"),
        "ours_torch_head": (ours, None, False, (policy, policy), "eager"),
        "ours_head_pool": (ours, None, True, (lambda n: 0, policy), "eager"),
        "ours_loop": (ours, None, True, (policy, policy), "loop"),
        "ours_graphed": (ours, None, True, (policy, policy), "graphed"),
        "ours_graphed_compiled": (ours, ours_static, True, (policy, policy), "graphed-compiled"),
        "ours_compiled": (oursc, oursc_static, True, (policy, policy), "eager"),
        "bf16_eager": (bf16, None, False, (policy, policy), "eager"),
        "bf16_compiled": (bf16c, static, False, (policy, policy), "eager"),
    }
    if args.clock == "cpu":  # the pool's threads are not on the timed thread's clock
        del contenders["ours_head_pool"]
    contenders = {k: v for k, v in contenders.items() if wanted(k)}

    def run(name: str, new: int) -> float:
        model, cache, gemv_head, (head_threads, threads_4bit), loop = contenders[name]
        head.use_gemv = gemv_head
        gemv_bf16_module.gemv_threads = head_threads
        cpu_gemv.gemv_threads = threads_4bit
        if loop == "loop":
            return time_loop(model, ids, new)
        t0 = _clock()
        bg.time_generate(model, ids, new, cache, "cpu", mode=loop)
        return _clock() - t0

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
    step_ms = {k: (b - a) / (args.new - 1) * 1e3 for k, (a, b) in best.items()}
    result = {
        "machine": f"cpu x{torch.get_num_threads()} torch threads",
        "cpu": _cpu_model(),
        "isa": isa,
        "clock": args.clock,
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", ""),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "loadavg_start": [round(v, 2) for v in load_start],
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "rounds": args.rounds,
        "prompt": args.prompt,
        "new": args.new,
        "results": {
            k: {"decode_tok_s": round((args.new - 1) / (b - a), 2), "ttft_s": round(a, 4)}
            for k, (a, b) in best.items()
        },
    }
    if "ours" in step_ms and "ours_loop" in step_ms:
        result["generate_host_ms_per_step"] = round(step_ms["ours"] - step_ms["ours_loop"], 3)
    bf16_best = min((step_ms[k] for k in ("bf16_eager", "bf16_compiled") if k in step_ms), default=None)
    for name in ("ours", "ours_graphed", "ours_graphed_compiled", "ours_compiled"):
        if bf16_best is not None and name in step_ms:
            result[f"{name}_vs_bf16_best"] = round(bf16_best / step_ms[name], 3)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
