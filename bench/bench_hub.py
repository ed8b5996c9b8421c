"""Hub streaming benchmark: convert-from-Hub vs download-only vs local convert, on the fake Hub.

    python bench/bench_hub.py [--shards 8] [--hidden 1024] [--throttle-mbps 20]

Generates a Llama-shaped bf16 checkpoint of ``--shards`` shards (one decoder layer each, the
embedding in the first and the head in the last), serves it from tests/hub/fake_hub.py (throttled
to ``--throttle-mbps`` MB/s per connection so the download/quantize overlap is visible; the fake
Hub redirects LFS files to its CDN server as the real Hub does), and runs each contender in a fresh
subprocess:

- download only: ``hf_hub_download`` of the same shards one after another into a local_dir
- local convert: ``converter.convert`` from the local folder (quantize + write, no network)
- hub convert: ``converter.convert`` from the repo id (download one shard ahead + quantize + write)

For each: wall time inside the process (after imports), peak RSS (the child's VmHWM), and the
peak disk use of the child's private temp folder plus its output folder (sampled every 10 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "hub"))

CHILD_DOWNLOAD = """
import json, sys, time
from huggingface_hub import hf_hub_download
files = json.loads(sys.argv[2])
t = time.perf_counter()
for f in files:
    hf_hub_download(sys.argv[1], f, local_dir=sys.argv[3])
# VmHWM, not getrusage: ru_maxrss survives execve and would report the parent's peak.
rss = int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")).split()[1])
print(json.dumps({"seconds": time.perf_counter() - t, "rss_kib": rss}))
"""

CHILD_CONVERT = """
import json, sys, time
from converter.writer.pipeline import convert
import converter.sources.hub, transformers.models.llama.modeling_llama  # imports outside the timing
t = time.perf_counter()
r = convert(sys.argv[1], sys.argv[2], progress=False, threads=int(sys.argv[3]))
# VmHWM, not getrusage: ru_maxrss survives execve and would report the parent's peak.
rss = int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")).split()[1])
print(json.dumps({"seconds": time.perf_counter() - t, "bytes_out": r.bytes_out, "rss_kib": rss}))
"""


def make_checkpoint(path: Path, shards: int, hidden: int) -> int:
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    inter, vocab = int(hidden * 2.75) // 64 * 64, 8192
    weight_map: dict[str, str] = {}
    total = 0
    for k in range(shards):
        t: dict[str, torch.Tensor] = {}
        p = f"model.layers.{k}."
        for n, shape in (
            ("self_attn.q_proj", (hidden, hidden)),
            ("self_attn.k_proj", (hidden // 4, hidden)),
            ("self_attn.v_proj", (hidden // 4, hidden)),
            ("self_attn.o_proj", (hidden, hidden)),
            ("mlp.gate_proj", (inter, hidden)),
            ("mlp.up_proj", (inter, hidden)),
            ("mlp.down_proj", (hidden, inter)),
        ):
            t[p + n + ".weight"] = (torch.randn(*shape, generator=g) * 0.02).bfloat16()
        t[p + "input_layernorm.weight"] = torch.ones(hidden).bfloat16()
        t[p + "post_attention_layernorm.weight"] = torch.ones(hidden).bfloat16()
        if k == 0:
            t["model.embed_tokens.weight"] = torch.randn(vocab, hidden, generator=g).bfloat16()
        if k == shards - 1:
            t["model.norm.weight"] = torch.ones(hidden).bfloat16()
            t["lm_head.weight"] = (torch.randn(vocab, hidden, generator=g) * 0.02).bfloat16()
        name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file(t, str(path / name), metadata={"format": "pt"})
        total += (path / name).stat().st_size
        weight_map.update(dict.fromkeys(t, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": shards,
        "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 256,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer_config.json").write_text("{}")
    return total


def tree_bytes(*folders: Path) -> int:
    total = 0
    for folder in folders:
        for dirpath, _, files in os.walk(folder):
            for f in files:
                try:
                    total += os.stat(os.path.join(dirpath, f)).st_blocks * 512
                except OSError:
                    pass
    return total


def run_child(code: str, args: list[str], env: dict[str, str], watch: list[Path]) -> dict:
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_bytes(*watch))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, cwd=ROOT
    )
    wall = time.perf_counter() - t
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        msg = f"child failed:\n{proc.stderr[-3000:]}"
        raise SystemExit(msg)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out.update(process_wall=wall, peak_disk=peak)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--throttle-mbps", type=float, default=20.0, help="per-connection MB/s of the fake Hub")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from fake_hub import FakeHub

    with tempfile.TemporaryDirectory(prefix="bench-hub-") as tmp_s:
        tmp = Path(tmp_s)
        src = tmp / "src"
        size = make_checkpoint(src, args.shards, args.hidden)
        shard_sizes = sorted(p.stat().st_size for p in src.glob("model-*.safetensors"))
        hub = FakeHub(tmp / "hub-store")
        hub.add_repo("bench/llama", src)
        hub.throttle_bps = args.throttle_mbps * 1e6
        files = sorted(p.name for p in src.glob("model-*.safetensors"))

        def env_for(name: str) -> tuple[dict[str, str], Path]:
            private_tmp = tmp / f"tmp-{name}"
            private_tmp.mkdir()
            env = dict(os.environ)
            env.update(
                HF_ENDPOINT=hub.endpoint,
                HF_HOME=str(tmp / f"home-{name}"),
                HF_HUB_OFFLINE="0",
                HF_HUB_DISABLE_XET="1",
                HF_HUB_DISABLE_PROGRESS_BARS="1",
                TMPDIR=str(private_tmp),
                TORCHDYNAMO_DISABLE="1",
            )
            return env, private_tmp

        results = {}
        env, ptmp = env_for("download")
        results["download only (hf_hub_download)"] = run_child(
            CHILD_DOWNLOAD, ["bench/llama", json.dumps(files), str(tmp / "dl")], env, [ptmp, tmp / "dl"]
        )
        hub.throttle_bps = None
        env, ptmp = env_for("local")
        results["local convert (no network)"] = run_child(
            CHILD_CONVERT,
            [str(src), str(tmp / "out-local"), str(args.threads)],
            env,
            [ptmp, tmp / "out-local"],
        )
        hub.throttle_bps = args.throttle_mbps * 1e6
        env, ptmp = env_for("hub")
        results["hub convert (streaming)"] = run_child(
            CHILD_CONVERT,
            ["bench/llama", str(tmp / "out-hub"), str(args.threads)],
            env,
            [ptmp, tmp / "out-hub"],
        )
        hub.close()

    mb = 1e6
    print(
        f"# Hub streaming benchmark ({time.strftime('%Y-%m-%d')}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs)"
    )
    print(
        f"checkpoint: {args.shards} shards, {size / mb:.1f} MB bf16 "
        f"(shards {shard_sizes[0] / mb:.1f}-{shard_sizes[-1] / mb:.1f} MB); "
        f"fake Hub throttled to {args.throttle_mbps:g} MB/s per connection (302 to its CDN server)"
    )
    print()
    print("| run | s (in process) | s (with start-up) | peak RSS MB | peak disk MB (private tmp + output) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        rss = f"{r['rss_kib'] / 1024:.0f}"
        print(
            f"| {name} | {r['seconds']:.2f} | {r['process_wall']:.2f} | {rss} | {r['peak_disk'] / mb:.1f} |"
        )
    d = results["download only (hf_hub_download)"]["seconds"]
    q = results["local convert (no network)"]["seconds"]
    h = results["hub convert (streaming)"]["seconds"]
    two = (shard_sizes[-1] + shard_sizes[-2]) / mb
    out_mb = results["hub convert (streaming)"]["bytes_out"] / mb
    print()
    print(f"- hub convert / download only: {h / d:.2f}")
    print(f"- hub convert / (download + local convert), 1.0 = no overlap: {h / (d + q):.2f}")
    print(
        f"- bound for peak disk: two largest source shards {two:.1f} MB + output {out_mb:.1f} MB "
        f"= {two + out_mb:.1f} MB"
    )


if __name__ == "__main__":
    main()
