"""Peak host memory of ``quantize-model dequantize`` on a Llama 4 folder, against the size of its largest
fused experts tensor (docs/benchmarks.md, "dequantize writes fused experts expert by expert").

A random one-layer Llama 4 text model (16 experts of ``--intermediate`` 4096, hidden 1024, vocab 8192:
its fused ``gate_up_proj [16, 1024, 8192]`` is 256 MiB in bf16, 512 MiB in float32) is converted with
``--moe-experts quantize`` (NF4, nested absmax) and ``keep``, then dequantized in a fresh interpreter
per row with ``verify=False``. The peak of RssAnon (heap: tensors) is sampled every 0.5 ms above the
process just before the call (torch, transformers and the converter imported). A dequantize that builds
a fused tensor whole needs at least that tensor's bytes on top; one that writes it expert by expert
needs about one expert's block (16 MiB in bf16 here) plus the meta model transformers builds for the
float32 plan (bf16 / fp16 output only).

``python bench/bench_dequantize_memory.py [--work DIR] [--intermediate N] [--json FILE]``; run it with
``PYTHONPATH`` at another checkout to measure that one's dequantize on the same folders.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from random_source import RandomSource

SHAPES = dict(
    hidden_size=1024, intermediate_size=4096, intermediate_size_mlp=4096, num_local_experts=16,
    num_experts_per_tok=1, num_attention_heads=8, num_key_value_heads=2, head_dim=128, vocab_size=8192,
)  # fmt: skip

_CHILD = """
import json, sys, time
import torch, transformers
from converter.loader.dequantize import dequantize_checkpoint
from converter.tools.peak_rss import PeakRss

with PeakRss(("RssAnon",)) as rss:  # sampled every 0.5 ms
    t0 = time.perf_counter()
    dequantize_checkpoint(sys.argv[1], sys.argv[2], dtype=sys.argv[3], verify=False, overwrite=True)
    seconds = time.perf_counter() - t0
print(json.dumps({"peak_anon": rss.grown["RssAnon"], "seconds": seconds}))
"""


def _folder(work: Path, mode: str, shapes: dict) -> Path:
    import transformers

    from converter.writer.pipeline import convert

    out = work / f"llama4-1l-i{shapes['intermediate_size']}-{mode}"
    if (out / "config.json").exists():
        return out
    cfg = transformers.Llama4TextConfig(**shapes, num_hidden_layers=1, pad_token_id=0)
    cfg.architectures = ["Llama4ForCausalLM"]
    with torch.device("meta"):
        meta = transformers.Llama4ForCausalLM(cfg)
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(RandomSource(cfg.to_dict(), shapes), out, moe_experts=mode, progress=False, overwrite=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--intermediate", type=int, default=SHAPES["intermediate_size"], help="experts' width")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    shapes = {**SHAPES, "intermediate_size": args.intermediate, "intermediate_size_mlp": args.intermediate}
    work = Path(args.work or tempfile.mkdtemp(prefix="dq-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    h, i, e = shapes["hidden_size"], shapes["intermediate_size"], shapes["num_local_experts"]
    import converter

    where = Path(converter.__file__).parent.parent
    day = time.strftime("%Y-%m-%d")
    print(f"{platform.machine()}, torch {torch.__version__}, {day}, converter from {where}")
    print("| folder | dtype | peak RssAnon above the imports (MiB) | largest fused tensor (MiB) | seconds |")
    print("|---|---|---|---|---|")
    rows = []
    for mode in ("quantize", "keep"):
        folder = _folder(work, mode, shapes)
        for dtype, size in (("bfloat16", 2), ("float16", 2), ("float32", 4)):
            out = work / f"plain-{mode}-{dtype}"
            run = subprocess.run(
                [sys.executable, "-c", _CHILD, str(folder), str(out), dtype],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            got = json.loads(run.stdout.strip().splitlines()[-1])
            fused = e * h * 2 * i * size
            rows.append({"mode": mode, "dtype": dtype, **got, "fused_bytes": fused})
            peak, mib = got["peak_anon"] / 2**20, fused / 2**20
            print(f"| {mode} | {dtype} | {peak:.0f} | {mib:.0f} | {got['seconds']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
