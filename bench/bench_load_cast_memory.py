"""Peak host memory of ``load_quantized`` with a dtype cast of the unquantized tensors, with and without
disk offload (docs/benchmarks.md, "Offloaded loading").

A random Llama (hidden 2048, 4 layers, vocab 32000, untied head: its bf16 embedding and head are
131 MB each, 262 MB each in float32) is saved, converted to NF4 + nested absmax, and loaded in a fresh
interpreter per row with ``verify=False`` (the hashing's own buffers are not what is measured). Peaks
of VmRSS, RssAnon (heap: tensors) and RssFile (file-backed: mapped shard pages, offload files) are
sampled every 0.5 ms above the process just before the call (torch, transformers, the Llama modules and
accelerate imported); "after" is the process once the call returned.

``python bench/bench_load_cast_memory.py [--work DIR]`` (DIR: scratch folder, default a temp dir).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = """
import json, sys
import torch, accelerate, transformers
from transformers.models.llama import modeling_llama
from converter import load_quantized
from converter.tools.peak_rss import PeakRss

kwargs = json.loads(sys.argv[2])
with PeakRss(("VmRSS", "RssAnon", "RssFile")) as rss:  # sampled every 0.5 ms
    model = load_quantized(sys.argv[1], dtype=getattr(torch, kwargs.pop("dtype")), verify=False, **kwargs)
print(json.dumps({"peak": rss.grown, "after": {k: rss.after[k] - rss.before[k] for k in rss.keys}}))
"""

HALF = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "cpu",
    "model.layers.2": "disk",
    "model.layers.3": "disk",
    "model.norm": "disk",
    "model.rotary_emb": "cpu",
    "lm_head": "disk",
}


def _model(work: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from converter import convert

    out = work / "nf4"
    if not out.exists():
        config = LlamaConfig(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=4,
            num_attention_heads=16,
            num_key_value_heads=16,
            vocab_size=32000,
            tie_word_embeddings=False,
        )
        torch.manual_seed(0)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(work / "src")
        convert(work / "src", out, quant_type="nf4", double_quant=True, progress=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="qm-cast-mem-"))
    folder = _model(work)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "TORCHDYNAMO_DISABLE": "1"}
    rows = []
    for dtype in ("bfloat16", "float32"):
        rows += [
            (dtype, "single device (no device_map)", {}),
            (dtype, 'device_map="cpu"', {"device_map": "cpu"}),
            (dtype, "half on disk", {"device_map": HALF, "offload_folder": str(work / "off")}),
            (dtype, '{"": "disk"}', {"device_map": {"": "disk"}, "offload_folder": str(work / "off")}),
        ]
    mb = 1e6
    kinds = ("VmRSS", "RssAnon", "RssFile")
    head = ["dtype", "load", *(f"{when} {kind}" for when in ("peak", "after") for kind in kinds)]
    print("| " + " | ".join(head) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype, label, kwargs in rows:
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(folder), json.dumps({"dtype": dtype, **kwargs})],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        r = json.loads(out.stdout.strip().splitlines()[-1])
        p, a = r["peak"], r["after"]
        cells = [p["VmRSS"], p["RssAnon"], p["RssFile"], a["VmRSS"], a["RssAnon"], a["RssFile"]]
        print(f"| {dtype} | {label} | " + " | ".join(f"{c / mb:.1f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
