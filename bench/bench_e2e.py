"""End to end as a user times it: whole processes, start-up included, side by side in one run.

Each contender is a fresh process (wall time from spawn to exit, peak RSS from ``wait4``), rounds
interleaved (A B C, A B C, ...), best and median reported with ratios:

- ``smollm2``: SmolLM2-135M bf16 (converter.tools.samples) -> nf4 nested. ``quantize-model convert`` vs
  transformers + bitsandbytes (``from_pretrained(load_in_4bit, device_map="cpu")`` + ``save_pretrained``)
  vs a plain copy of the files (``cp -r`` + ``sync``).
- ``smollm2-int8``: the same to LLM.int8: ``convert --quant-type int8`` vs ``load_in_8bit`` + save vs a copy.
- ``dequantize``: SmolLM2's nf4 folder back to bf16: ``dequantize`` vs transformers + bitsandbytes
  (``from_pretrained`` + ``dequantize()`` + ``save_pretrained``) vs a copy of the folder.
- ``big``: 18 tensors of 11008x4096 bf16 (1.6 GB, one file, random). ``quantize-model convert
  --include '*'`` as a whole process vs bitsandbytes' ``quantize_4bit`` (nf4, nested) alone on the same
  tensors, in-process (only the calls are timed; reading and start-up are free for it) vs a plain copy.
- ``cli``: the CLI's start as users time it: ``--help``, ``inspect FOLDER`` (as a script reads it: into
  a pipe, and with ``--json``), ``convert SmolLM2 OUT -q``; with ``--before-pythonpath DIR`` each
  also run from another checkout (the code before a change) in the same interleaved rounds.
- ``gpu``: a multi-GB bf16 Llama-shaped checkpoint (``--gpu-layers``/``--gpu-hidden``), ours with
  ``--device cuda`` and ``--device cpu`` vs a plain copy, page cache warm and (root) cold.

``--before DIR``: also run the ``quantize-model`` of another install (e.g. ``/work/main/.venv/bin``),
the code before a change, as one more contender. Run from outside the source tree:
``cd /tmp && python /path/to/bench/bench_e2e.py --rows smollm2,big``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from need_cuda import require_cuda
from page_cache import drop, warm

OURS = "import sys; from converter.cli import main; sys.argv[0] = 'quantize-model'; main()"

#: One --device cuda conversion that says whether it imported torch (bench checks the cuda row's path).
OURS_TORCH_PROBE = """
import json, sys
from converter.cli import main
sys.argv = ["quantize-model", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    if exc.code:
        raise
print(json.dumps({"torch_imported": "torch" in sys.modules}))
"""

HF_BNB = """
import sys, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                        bnb_4bit_compute_dtype=torch.bfloat16)
m = AutoModelForCausalLM.from_pretrained(
    sys.argv[1], quantization_config=qc, device_map="cpu", dtype=torch.bfloat16
)
m.save_pretrained(sys.argv[2])
"""

HF_BNB_INT8 = """
import sys, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
qc = BitsAndBytesConfig(load_in_8bit=True)
m = AutoModelForCausalLM.from_pretrained(
    sys.argv[1], quantization_config=qc, device_map="cpu", dtype=torch.bfloat16
)
m.save_pretrained(sys.argv[2])
"""

HF_BNB_DEQUANTIZE = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="cpu", dtype=torch.bfloat16)
m.dequantize()
m.save_pretrained(sys.argv[2])
"""

BNB_ALONE = """
import json, sys, time, torch, bitsandbytes.functional as F
from safetensors import safe_open
total = 0.0
with safe_open(sys.argv[1], framework="pt") as f:
    for k in f.keys():
        x = f.get_tensor(k)
        t0 = time.perf_counter()
        F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
        total += time.perf_counter() - t0
print(json.dumps({"seconds_in_process": total}))
"""


def run_rss(argv: list[str], cwd: str | None = None, env: dict | None = None) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of one whole process; RSS from wait4's rusage."""
    out_path = Path(tempfile.mkstemp(prefix="bench-e2e-")[1])
    try:
        with out_path.open("wb") as out, open(os.devnull, "wb") as devnull:
            t0 = time.perf_counter()
            p = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=devnull)
            _, status, ru = os.wait4(p.pid, 0)
            wall = time.perf_counter() - t0
            p.returncode = os.waitstatus_to_exitcode(status)
        text = out_path.read_text(errors="replace")
    finally:
        out_path.unlink(missing_ok=True)
    if p.returncode != 0:
        err = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True).stderr[-2000:]
        msg = f"{' '.join(argv[:6])} ... failed ({p.returncode}): {err}"
        raise SystemExit(msg)
    return wall, ru.ru_maxrss * 1024, text


def fresh_run(dst: Path, argv: list[str]):
    """A contender: remove the output folder, then time ``argv`` as a whole process."""

    def go() -> tuple[float, int, str]:
        shutil.rmtree(dst, ignore_errors=True)
        return run_rss(argv)

    return go


def in_child(code: str) -> str:
    """Run ``code`` in a child interpreter (bench/ on its path), return its last output line.

    Data is made there so this process stays small: a child's peak RSS (wait4) starts from the RSS
    of the process that forked it, so the contenders' numbers would include ours otherwise.
    """
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return (r.stdout.strip().splitlines() or [""])[-1]


def rounds(contenders: dict, repeat: int, before_each=None) -> dict[str, list[tuple]]:
    results: dict[str, list[tuple]] = {name: [] for name in contenders}
    for _ in range(repeat):
        for name, fn in contenders.items():
            if before_each is not None:
                before_each()
            results[name].append(fn())
    return results


def report(title: str, results: dict[str, list[tuple]], reference: str, out: dict) -> None:
    print(f"\n{title}")
    best_ref = min(r[0] for r in results[reference])
    print(f"  {'contender':44s} {'best s':>8s} {'median s':>9s} {'peak RSS MB':>12s} {'x ' + reference:>14s}")
    rows = {}
    for name, rs in results.items():
        walls = [r[0] for r in rs]
        best, med = min(walls), statistics.median(walls)
        rss = max(r[1] for r in rs) / 2**20
        ratio = best / best_ref
        rows[name] = {"best_s": best, "median_s": med, "all_s": walls, "peak_rss_mb": rss, "ratio": ratio}
        print(f"  {name:44s} {best:8.2f} {med:9.2f} {rss:12.0f} {ratio:14.2f}", flush=True)
    out[title] = rows


def ours_argv(python: str, *args: str) -> list[str]:
    return [python, "-c", OURS, *args]


def row_smollm2(args, python: str, work: Path, out: dict, method: str = "nf4") -> None:
    """``method`` "nf4" (nested) or "int8" (LLM.int8: ``--quant-type int8`` vs ``load_in_8bit``)."""
    make = "from pathlib import Path; from converter.tools import samples; "
    make += f"print(samples.smollm2(Path({args.samples!r})))"
    src = Path(in_child(make))
    dst = work / "out"

    fresh = functools.partial(fresh_run, dst)
    label = "nf4 nested" if method == "nf4" else "int8"
    extra = [] if method == "nf4" else ["--quant-type", "int8"]
    ours_name = f"quantize-model convert ({label})"
    hf_name = f"transformers + bitsandbytes (load_in_{4 if method == 'nf4' else 8}bit + save)"
    hf_code = HF_BNB if method == "nf4" else HF_BNB_INT8
    contenders = {
        ours_name: fresh(ours_argv(python, "convert", str(src), str(dst), *extra, "-q")),
        hf_name: fresh([python, "-c", hf_code, str(src), str(dst)]),
        "plain copy (cp -r + sync)": fresh(["sh", "-c", f"cp -r '{src}' '{dst}' && sync '{dst}'/*"]),
    }
    if args.before:
        before = str(Path(args.before) / "quantize-model")
        contenders["quantize-model before (--before)"] = fresh(
            [before, "convert", str(src), str(dst), *extra, "-q"]
        )
    warm(src)
    res = rounds(contenders, args.repeat)
    title = f"SmolLM2-135M bf16 -> {label}, whole processes"
    report(title, res, ours_name, out)
    hf = min(r[0] for r in res[hf_name])
    ours = min(r[0] for r in res[ours_name])
    print(f"  transformers + bnb / ours: {hf / ours:.2f}x")
    out[title]["hf_over_ours"] = hf / ours


def smollm2_nf4(args, python: str, work: Path) -> tuple[Path, Path]:
    """SmolLM2-135M's sample checkpoint and its nf4 folder under ``work`` (converted once by
    ``quantize-model convert``)."""
    make = "from pathlib import Path; from converter.tools import samples; "
    make += f"print(samples.smollm2(Path({args.samples!r})))"
    src = Path(in_child(make))
    folder = work / "nf4"
    if not (folder / "config.json").is_file():
        subprocess.run(ours_argv(python, "convert", str(src), str(folder), "-q"), check=True)
    return src, folder


def row_dequantize(args, python: str, work: Path, out: dict) -> None:
    """SmolLM2-135M's nf4 folder (ours) back to a plain bf16 checkpoint, whole processes: ``quantize-model
    dequantize`` vs transformers + bitsandbytes (``from_pretrained`` of the folder, ``dequantize()``,
    ``save_pretrained``) vs a plain copy of the folder."""
    _, folder = smollm2_nf4(args, python, work)
    dst = work / "out"
    fresh = functools.partial(fresh_run, dst)
    ours_name = "quantize-model dequantize"
    hf_name = "transformers + bitsandbytes (from_pretrained + dequantize() + save)"
    contenders = {
        ours_name: fresh(ours_argv(python, "dequantize", str(folder), str(dst), "-q")),
        hf_name: fresh([python, "-c", HF_BNB_DEQUANTIZE, str(folder), str(dst)]),
        "plain copy (cp -r + sync)": fresh(["sh", "-c", f"cp -r '{folder}' '{dst}' && sync '{dst}'/*"]),
    }
    if args.before:
        before = str(Path(args.before) / "quantize-model")
        contenders["quantize-model before (--before)"] = fresh(
            [before, "dequantize", str(folder), str(dst), "-q"]
        )
    warm(folder)
    res = rounds(contenders, args.repeat)
    title = "SmolLM2-135M nf4 -> bf16 (dequantize), whole processes"
    report(title, res, ours_name, out)
    hf = min(r[0] for r in res[hf_name])
    ours = min(r[0] for r in res[ours_name])
    print(f"  transformers + bnb / ours: {hf / ours:.2f}x")
    out[title]["hf_over_ours"] = hf / ours


def write_big(path: Path, n: int = 18, shape: tuple[int, int] = (11008, 4096)) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    size = 2 * shape[0] * shape[1]
    for i in range(n):
        header[f"layers.{i}.mlp.weight"] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [i * size, (i + 1) * size],
        }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    import numpy as np

    rng = np.random.default_rng(0)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _ in range(n):
            x = (rng.standard_normal(shape, dtype=np.float32) * 0.02).view(np.uint32)
            f.write(((x + 0x8000) >> 16).astype(np.uint16).tobytes())  # bf16 bits (round half up)


def row_big(args, python: str, work: Path, out: dict) -> None:
    src_dir = work / "big"
    src_dir.mkdir(exist_ok=True)
    src = src_dir / "model.safetensors"
    if not src.exists():
        in_child(f"import bench_e2e; bench_e2e.write_big(bench_e2e.Path({str(src)!r}))")
    dst = work / "big-out"

    fresh = functools.partial(fresh_run, dst)

    contenders = {
        "quantize-model convert --include '*'": fresh(
            ours_argv(python, "convert", str(src), str(dst), "--include", "*", "-q")
        ),
        "bnb quantize_4bit alone (in-process calls only)": fresh([python, "-c", BNB_ALONE, str(src)]),
        "plain copy (cp + sync)": fresh(
            ["sh", "-c", f"mkdir -p '{dst}' && cp '{src}' '{dst}/' && sync '{dst}'/*"]
        ),
    }
    if args.before:
        before = str(Path(args.before) / "quantize-model")
        contenders["quantize-model before (--before)"] = fresh(
            [before, "convert", str(src), str(dst), "--include", "*", "-q"]
        )
    warm(src_dir)
    res = rounds(contenders, args.repeat)
    title = "18 x 11008x4096 bf16 (1.6 GB) -> nf4 nested"
    report(title, res, "quantize-model convert --include '*'", out)
    bnb_in = min(
        json.loads(r[2])["seconds_in_process"] for r in res["bnb quantize_4bit alone (in-process calls only)"]
    )
    ours = min(r[0] for r in res["quantize-model convert --include '*'"])
    print(
        f"  bnb quantize_4bit calls alone: {bnb_in:.2f} s in-process; / ours end to end: {bnb_in / ours:.2f}x"
    )
    out[title]["bnb_calls_seconds"] = bnb_in
    out[title]["bnb_calls_over_ours"] = bnb_in / ours


def write_llama(folder: Path, layers: int, hidden: int, shard_bytes: int = 2 * 10**9) -> int:
    """A bf16 Llama-shaped checkpoint (config, shards, index) written fast: every tensor cycles through
    one pool of random bf16 values (the kernels' time does not depend on the values)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_convert import llama_shapes, numel, shard_groups

    inter, vocab, kv = int(hidden * 2.75) // 64 * 64, 32000, hidden // 4
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 256,
        "head_dim": 64,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    import numpy as np

    rng = np.random.default_rng(0)
    pool = ((rng.standard_normal(1 << 26, dtype=np.float32) * 0.02).view(np.uint32) + 0x8000) >> 16
    pool = pool.astype(np.uint16).view(np.uint8)  # 128 MB of bf16 bits
    groups = shard_groups(llama_shapes(layers, hidden, inter, vocab, kv), shard_bytes)
    weight_map, total, cursor = {}, 0, 0
    for k, group in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in group:
            header[name] = {
                "dtype": "BF16",
                "shape": list(shape),
                "data_offsets": [offset, offset + 2 * numel(shape)],
            }
            offset += 2 * numel(shape)
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with (folder / fname).open("wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            left = offset
            while left:
                start = cursor % (pool.size - 4096) & ~1
                n = min(left, pool.size - start)
                f.write(pool[start : start + n].data)
                left -= n
                cursor += n + 4098
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def row_gpu(args, python: str, work: Path, out: dict) -> None:
    require_cuda("bench_e2e.py --rows gpu", torch_free=True)  # before writing the checkpoint
    src = work / "gpu-src"
    if not (src / "model.safetensors.index.json").exists():
        shape = f"{args.gpu_layers}, {args.gpu_hidden}"
        in_child(f"import bench_e2e; bench_e2e.write_llama(bench_e2e.Path({str(src)!r}), {shape})")
    total = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    print(
        f"\ncheckpoint: {src} ({total / 1e9:.2f} GB, {args.gpu_layers} layers, hidden {args.gpu_hidden})",
        flush=True,
    )
    dst = work / "gpu-out"

    fresh = functools.partial(fresh_run, dst)

    contenders = {
        "quantize-model convert --device cuda": fresh(
            ours_argv(python, "convert", str(src), str(dst), "--device", "cuda", "-q")
        ),
        "quantize-model convert --device cpu": fresh(
            ours_argv(python, "convert", str(src), str(dst), "--device", "cpu", "-q")
        ),
        "plain copy (cp -r + sync)": fresh(["sh", "-c", f"cp -r '{src}' '{dst}' && sync '{dst}'/*"]),
    }
    # One untimed conversion first: it fills the per-user selection cache when the shipped table is
    # for another transformers version (what every later run of that user sees), and loads the
    # libraries from disk once.
    t0 = time.perf_counter()
    fresh(ours_argv(python, "convert", str(src), str(dst), "-q"))()
    print(
        f"  first conversion (fills the selection cache if needed): {time.perf_counter() - t0:.2f} s",
        flush=True,
    )
    out["cuda_path"] = check_cuda_path(python, src, dst)
    if out["cuda_path"]["device"] is None:  # the "--device cuda" row would time the CPU path
        msg = "bench_e2e.py --rows gpu: --device cuda fell back to the CPU (see above)"
        raise SystemExit(msg)
    warm(src)
    res = rounds(contenders, args.repeat)
    report(f"{total / 1e9:.2f} GB bf16 Llama, warm page cache", res, "plain copy (cp -r + sync)", out)
    save(args, out)
    dropped = drop(src)
    if dropped:
        res = rounds(contenders, args.repeat, before_each=lambda: drop(src))
        report(
            f"{total / 1e9:.2f} GB bf16 Llama, cold ({dropped} dropped before each run)",
            res,
            "plain copy (cp -r + sync)",
            out,
        )
    else:
        print("  cold page cache: cannot drop it here (skipped)")


def check_cuda_path(python: str, src: Path, dst: Path) -> dict:
    """One untimed ``--device cuda`` conversion: did it quantize on the GPU (the report's
    ``timings.device``, written by converter.quantize.cuda_host) and without importing torch? Printed, so a
    cuda row that silently fell back to the CPU cannot pass for a GPU number."""
    shutil.rmtree(dst, ignore_errors=True)
    argv = [python, "-c", OURS_TORCH_PROBE, "convert", str(src), str(dst), "--device", "cuda", "-q"]
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        msg = f"--device cuda conversion failed: {r.stderr[-2000:]}"
        raise SystemExit(msg)
    probe = json.loads(r.stdout.strip().splitlines()[-1])
    report_path = dst / "quantization_report.json"
    device = json.loads(report_path.read_text())["timings"].get("device") or {}
    got = {"device": device.get("device"), "torch_imported": probe["torch_imported"], **device}
    if not device:
        print(f"  WARNING: --device cuda fell back to the CPU: {r.stderr.strip()[-500:]}", flush=True)
    else:
        times = {k.removeprefix("seconds_"): v for k, v in device.items() if k.startswith("seconds_")}
        split = ", ".join(f"{k} {v:.2f} s" for k, v in times.items())
        print(
            f"  --device cuda path: {device['device']}, torch imported: {probe['torch_imported']}; {split}",
            flush=True,
        )
    return got


def row_cli(args, python: str, work: Path, out: dict) -> None:
    """The CLI's whole processes, start-up included (docs/benchmarks.md, round 48)."""
    src, folder = smollm2_nf4(args, python, work)
    dst = work / "out"
    commands = {
        "--help": ["--help"],
        "inspect FOLDER": ["inspect", str(folder)],
        "inspect FOLDER --json": ["inspect", str(folder), "--json"],
        "convert SmolLM2 OUT -q": ["convert", str(src), str(dst), "-q"],
    }
    installs = {"ours": None}
    if args.before_pythonpath:
        installs["before"] = {**os.environ, "PYTHONPATH": args.before_pythonpath}
    contenders = {}
    for label, argv in commands.items():
        for install, env in installs.items():

            def go(argv=argv, env=env) -> tuple[float, int, str]:
                shutil.rmtree(dst, ignore_errors=True)
                return run_rss(ours_argv(python, *argv), env=env)

            contenders[f"{install}: {label}"] = go
    warm(src)
    warm(folder)
    print(f"\ncli row: load average before {os.getloadavg()}", flush=True)
    res = rounds(contenders, args.repeat)
    print(f"cli row: load average after {os.getloadavg()}")
    for label in commands:
        rows = {f"{install}: {label}": res[f"{install}: {label}"] for install in installs}
        report(f"quantize-model {label}, whole processes", rows, f"ours: {label}", out)


def save(args, out: dict) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--rows", default="smollm2,big", help="comma list of smollm2, smollm2-int8, dequantize, big, cli, gpu"
    )
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--samples", default=str(Path(__file__).resolve().parents[1] / ".cache" / "samples"))
    ap.add_argument("--before", default=None, help="bin folder of another install to compare with")
    ap.add_argument(
        "--before-pythonpath", default=None, help="cli row: a checkout (PYTHONPATH) of the code before"
    )
    ap.add_argument("--gpu-layers", type=int, default=28)
    ap.add_argument("--gpu-hidden", type=int, default=3072)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    python = sys.executable
    cpu = platform.processor() or platform.machine()
    print(f"{platform.node()} {cpu}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    out: dict = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-e2e-") as tmp:
        work = Path(tmp)
        for row in args.rows.split(","):
            {
                "smollm2": row_smollm2,
                "smollm2-int8": functools.partial(row_smollm2, method="int8"),
                "dequantize": row_dequantize,
                "big": row_big,
                "cli": row_cli,
                "gpu": row_gpu,
            }[row](args, python, work, out)
            save(args, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
