"""Offloaded loading: generate() with device_map/max_memory, memory held and speed.

--device cpu (default): SmolLM2-135M NF4 (real weights, converter/tools/samples.py) disk-offloaded with
``max_memory={"cpu": BUDGET}``; reports what the plan put where, peak RSS split into anonymous memory
(RssAnon: interpreter, torch, activations, KV cache) and file-backed pages (RssFile: shared libraries
and the mapped shard pages), the shard pages alone (from /proc/self/smaps), sampled every millisecond
through load + generate, against the interpreter's RSS before loading; and the same for a plain
single-device load (every touched shard page stays resident) for contrast.

--device cuda: an 8B NF4 folder (--model, converted from --source) with ``max_memory`` putting about
half of it on the CPU:
time to first token and decode tok/s for ours vs transformers + bitsandbytes with the same device_map
(transformers keeps the CPU half in float with llm_int8_enable_fp32_cpu_offload and streams it to the
GPU; ours runs it on the CPU in 4-bit). Needs a GPU (run on an H200, 2026-12-04: docs/benchmarks.md,
"Offloaded loading"); ``bench/cuda_session_run.sh offload`` runs it on bench_generate.py's random-8b
folder: ``--model /tmp/qm_gen/llama8b-32-nf4 --source /tmp/qm_gen/llama8b-32 --tokens 16``.

Run it from outside the source tree: ``cd /tmp && python /path/to/bench/bench_offload.py``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from need_cuda import require_cuda

from converter.tools.samples import DEFAULT_SAMPLES_DIR

PROMPT = "The capital of France is"


def _status() -> dict[str, int]:
    """RssAnon, RssFile, VmRSS, VmHWM of this process in bytes (/proc/self/status)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _mapped_rss(paths: set[str]) -> int:
    """Resident bytes of this process's mappings of ``paths`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split(maxsplit=5)
        if "-" in first[0] and len(first) >= 5 and not first[0].endswith(":"):
            inside = len(first) == 6 and first[5] in paths
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


class Sampler:
    """Peak RssAnon / RssFile / shard-mapped Rss, sampled in a thread (torch kernels release the GIL)."""

    def __init__(self, shard_paths: set[str], period: float = 0.001) -> None:
        self.paths, self.period = shard_paths, period
        self.peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0, "shards": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        s = _status()
        s["shards"] = _mapped_rss(self.paths)
        for k in self.peak:
            self.peak[k] = max(self.peak[k], s[k])

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.period)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


ROWS = {
    "offload": "device_map='auto', max_memory={'cpu': BUDGET}",
    "single": "single-device load (no device_map)",
}


def run_row(args: argparse.Namespace) -> dict:
    """One load + generate in this (fresh) process, measured against the RSS it had just before."""
    from transformers import AutoTokenizer
    from transformers.generation import utils as _generation  # noqa: F401  (imported before the baseline)

    from converter.loader.estimate import estimate
    from converter.loader.model import load_quantized
    from converter.loader.state import shard_files
    from converter.tools import samples

    folder = Path(args.model)
    paths = {str(p.resolve()) for p in shard_files(folder)[0]}
    tokenizer = AutoTokenizer.from_pretrained(samples.smollm2(Path(args.samples)))
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    max_memory = {"cpu": args.budget}
    kwargs = {"device_map": "auto", "max_memory": max_memory} if args.row == "offload" else {}
    plan, per_device = estimate(folder, "auto", max_memory)  # also imports the model class's modules
    gc.collect()
    baseline = _status()
    with Sampler(paths) as s:
        t0 = time.perf_counter()
        model = load_quantized(folder, verify=False, **kwargs)
        load_s = time.perf_counter() - t0
        out = model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
    # Timed again without the sampler (parsing smaps every millisecond takes CPU from the 2 cores).
    t1 = time.perf_counter()
    model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
    t2 = time.perf_counter()
    return {
        "baseline": baseline,
        "plan": {k: str(v) for k, v in plan.items()},
        "estimate": per_device,
        "load_s": load_s,
        "generate_tok_s": args.tokens / (t2 - t1),
        "peak": dict(s.peak),
        "text": tokenizer.decode(out[0, ids.shape[1] :]),
        "footprint": model.get_memory_footprint(),
    }


def run_cpu(args: argparse.Namespace) -> dict[str, dict]:
    """Each row in its own interpreter, so one load's pages and imports never count in another's."""
    folder = Path(args.model) if args.model else _smollm2_nf4(Path(args.work), Path(args.samples))
    out: dict[str, dict] = {}
    for _ in range(args.rounds):  # rows alternate; memory is the worst round's, speed the best round's
        for row in ROWS:
            cmd = [sys.executable, __file__, "--row", row, "--model", str(folder), "--budget", args.budget,
                   "--tokens", str(args.tokens), "--samples", args.samples]  # fmt: skip
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            if row in out:
                best = out[row]
                # peaks as rises over each round's own baseline ("shards" is absolute already)
                rise = {k: v - r["baseline"].get(k, 0) for k, v in r["peak"].items()}
                old = {k: v - best["baseline"].get(k, 0) for k, v in best["peak"].items()}
                r["peak"] = {k: max(rise[k], old[k]) + r["baseline"].get(k, 0) for k in rise}
                r["generate_tok_s"] = max(r["generate_tok_s"], best["generate_tok_s"])
            out[row] = r
    return out


def _smollm2_nf4(work: Path, samples_dir: Path) -> Path:
    from converter.tools import samples
    from converter.writer.pipeline import convert

    out = work / "smollm2-nf4"
    if not (out / "model.safetensors.index.json").is_file():
        convert(samples.smollm2(samples_dir), out, progress=False)
    return out


def print_cpu(rows: dict[str, dict], budget: str) -> None:
    first = rows["offload"]
    counts: dict[str, int] = {}
    for device in first["plan"].values():
        counts[device] = counts.get(device, 0) + 1
    print(f"plan for max_memory cpu={budget}: map entries per device {counts}; estimate "
          + ", ".join(f"{k} {_mb(v)}" for k, v in first["estimate"].items()))  # fmt: skip
    print(
        "| load | interpreter VmRSS before loading | peak VmRSS - before | peak RssAnon - before "
        "| peak RssFile - before | peak shard pages resident | generate tok/s | get_memory_footprint |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row, r in rows.items():
        p, b = r["peak"], r["baseline"]
        label = ROWS[row].replace("BUDGET", repr(budget))
        print(
            f"| {label} | {_mb(b['VmRSS'])} | {_mb(p['VmRSS'] - b['VmRSS'])} "
            f"| {_mb(p['RssAnon'] - b['RssAnon'])} | {_mb(p['RssFile'] - b['RssFile'])} | {_mb(p['shards'])} "
            f"| {r['generate_tok_s']:.1f} | {_mb(r['footprint'])} |"
        )
    for row, r in rows.items():
        print(f"{row}: {r['text']!r}")


def run_cuda(args: argparse.Namespace) -> None:
    """Ours vs transformers + bnb, same device_map, about half of the model on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from converter.loader.estimate import estimate
    from converter.loader.model import load_quantized

    folder = Path(args.model)
    _, sizes = estimate(folder, {"": 0})
    half = f"{sum(sizes.values()) // 2 // 2**20}MiB"
    max_memory = {0: args.gpu_budget or half, "cpu": "200GiB"}
    plan, per_device = estimate(folder, "auto", max_memory)
    print(f"max_memory {max_memory}: ours holds " + ", ".join(f"{k} {_mb(v)}" for k, v in per_device.items()))
    if (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists():
        ids = AutoTokenizer.from_pretrained(folder)(PROMPT, return_tensors="pt").input_ids.to("cuda:0")
    else:  # a random-weight model (bench_generate's random-8b) has no tokenizer: fixed ids
        ids = torch.arange(100, 100 + args.prompt, device="cuda:0")[None]

    def timed(model) -> tuple[float, float]:
        # Warm-up with the timed length (the attention backend builds a plan per key length on Hopper).
        model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False)
        torch.cuda.synchronize()
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
        torch.cuda.synchronize()
        return ttft, (args.tokens - 1) / (time.perf_counter() - t0 - ttft)

    ours = load_quantized(folder, device_map=plan)
    t_ours = timed(ours)
    del ours
    gc.collect()
    torch.cuda.empty_cache()
    # transformers + bnb: the same map; its CPU modules are kept in float (bnb cannot hold 4-bit on CPU
    # under a device_map) and streamed to the GPU by accelerate's offload hooks.
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_enable_fp32_cpu_offload=True,
    )
    theirs = AutoModelForCausalLM.from_pretrained(
        args.source, device_map=plan, quantization_config=config, dtype=torch.bfloat16
    )
    t_theirs = timed(theirs)
    print("| model | TTFT ms | decode tok/s |")
    print("|---|---|---|")
    print(f"| ours, device_map as above | {t_ours[0] * 1e3:.0f} | {t_ours[1]:.2f} |")
    print(f"| transformers + bnb, same map | {t_theirs[0] * 1e3:.0f} | {t_theirs[1]:.2f} |")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model", help="a converted NF4 folder (default on cpu: SmolLM2-135M, converted)")
    ap.add_argument("--budget", default="60MB", help="max_memory['cpu'] for --device cpu")
    ap.add_argument("--source", help="--device cuda: the original bf16 folder, quantized at load by bnb")
    ap.add_argument("--gpu-budget", help="max_memory[0] for --device cuda (default: half the model)")
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--prompt", type=int, default=32, help="--device cuda, no tokenizer: prompt length")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (--device cpu)")
    ap.add_argument("--work", default="/tmp/qm-bench-offload")
    ap.add_argument(  # where the other benchmarks take SmolLM2 from (QM_SAMPLES_DIR, else ./.cache/samples)
        "--samples", default=os.environ.get("QM_SAMPLES_DIR", str(DEFAULT_SAMPLES_DIR))
    )
    ap.add_argument("--row", choices=list(ROWS), help=argparse.SUPPRESS)  # internal: one measured run
    return ap


def main() -> None:
    ap = build_parser()
    args = ap.parse_args()
    if args.row:
        print(json.dumps(run_row(args)))
        return
    if args.device == "cuda":
        if not (args.model and args.source):
            ap.error("--device cuda needs --model (our NF4 folder) and --source (its bf16 original)")
        require_cuda(__file__)
        run_cuda(args)
        return
    rows = run_cpu(args)
    print(f"machine: {os.cpu_count()} CPUs; torch {torch.__version__}; threads {torch.get_num_threads()}")
    print_cpu(rows, args.budget)


if __name__ == "__main__":
    main()
