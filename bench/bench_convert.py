"""Converting a multi-GB checkpoint: wall time and peak anonymous memory, ours vs a plain read + write.

Generates a bf16 Llama-like checkpoint (random data, written tensor by tensor, several shards plus
model.safetensors.index.json) in a temp folder, then measures, each in a fresh subprocess whose
/proc/<pid>/status is sampled every 5 ms:

- baseline: read every shard in 64 MB chunks and write a copy (fsynced, like our shards);
- ours: ``converter.convert(src, out)`` (nf4, blocksize 64, nested, default threads).

Targets (issue 3): peak RssAnon < 2 x largest tensor + 300 MB, wall time within 2x of the baseline.
The page cache is warmed by one read of every shard first, so both runs read from memory; with
``--cold`` (root) it is dropped before each contender instead, so both read the source from disk
(the libraries ours imports are loaded back by the start-up-only run first).

Run: ``python bench/bench_convert.py [--layers 20] [--hidden 2048] [--workdir /tmp]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import page_cache
import torch

CHUNK = 64 << 20


def llama_shapes(
    layers: int, hidden: int, inter: int, vocab: int, kv: int
) -> list[tuple[str, tuple[int, ...]]]:
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.self_attn.q_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.k_proj.weight", (kv, hidden)),
            (f"{p}.self_attn.v_proj.weight", (kv, hidden)),
            (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
            (f"{p}.mlp.gate_proj.weight", (inter, hidden)),
            (f"{p}.mlp.up_proj.weight", (inter, hidden)),
            (f"{p}.mlp.down_proj.weight", (hidden, inter)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def shard_groups(
    shapes: list[tuple[str, tuple[int, ...]]], shard_bytes: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """bf16 tensors in order, split into shards of at most shard_bytes (a larger tensor alone in one)."""
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        b = 2 * numel(shape)
        if groups[-1] and size + b > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += b
    return groups


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], gen: torch.Generator) -> None:
    """A safetensors file written header first, then one tensor at a time (never the whole shard)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        size = 2 * numel(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _name, shape in tensors:
            t = (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)
            f.write(t.view(torch.uint8).numpy().tobytes())
            del t


def make_checkpoint(folder: Path, layers: int, hidden: int, shard_bytes: int) -> tuple[int, int]:
    """Write the checkpoint; return (total bytes, largest tensor bytes)."""
    from transformers import LlamaConfig

    inter, vocab, kv = int(hidden * 2.75) // 64 * 64, 32000, hidden // 4
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 256,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(folder)
    shapes = llama_shapes(layers, hidden, inter, vocab, kv)
    groups = shard_groups(shapes, shard_bytes)
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    n = len(groups)
    for k, group in enumerate(groups, 1):
        name = f"model-{k:05d}-of-{n:05d}.safetensors"
        write_shard(folder / name, group, gen)
        weight_map.update(dict.fromkeys((t for t, _ in group), name))
    total = sum(2 * numel(s) for _, s in shapes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total, max(2 * numel(s) for _, s in shapes)


BASELINE = """
import os, sys
CHUNK = 64 << 20
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
for name in sorted(os.listdir(src)):
    if not name.endswith(".safetensors"):
        continue
    with open(os.path.join(src, name), "rb") as fi, open(os.path.join(dst, name), "wb") as fo:
        while block := fi.read(CHUNK):
            fo.write(block)
        fo.flush()
        os.fsync(fo.fileno())
"""

STARTUP = """
import converter.writer.pipeline
from transformers import LlamaForCausalLM
"""

OURS = """
import sys
from converter import convert
if sys.argv[3:] == ["no-prefetch"]:  # A/B of the pipeline's readahead of the next tensor
    from converter.sources.local import MappedFile
    MappedFile.prefetch = lambda self, name: None
convert(sys.argv[1], sys.argv[2], progress=False)
"""


def status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(code: str, *args: str) -> tuple[float, int, int]:
    """Run ``code`` in a subprocess; return (wall seconds, peak RssAnon bytes, peak VmRSS bytes)."""
    peak = {"anon": 0, "rss": 0}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args])
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak["anon"] = max(peak["anon"], status_kb(proc.pid, "RssAnon"))
            peak["rss"] = max(peak["rss"], status_kb(proc.pid, "VmRSS"))
            time.sleep(0.005)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    rc = proc.wait()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    if rc != 0:
        msg = f"benchmark subprocess failed with exit code {rc}"
        raise SystemExit(msg)
    return wall, peak["anon"] * 1024, peak["rss"] * 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--shard-size", type=int, default=500_000_000)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each run (root)")
    ap.add_argument("--no-prefetch", action="store_true", help="disable the next-tensor readahead")
    args = ap.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="qm-bench-convert-", dir=args.workdir))
    try:
        src = root / "src"
        t0 = time.perf_counter()
        total, largest = make_checkpoint(src, args.layers, args.hidden, args.shard_size)
        n_shards = len(list(src.glob("*.safetensors")))
        print(
            f"checkpoint: {total / 1e9:.2f} GB bf16 in {n_shards} shards, "
            f"largest tensor {largest / 1e6:.0f} MB (generated in {time.perf_counter() - t0:.1f} s)"
        )
        if not args.cold:
            page_cache.warm(src, "*.safetensors")
        startup = measure(STARTUP)
        rows = []
        for k in range(args.repeat):
            if args.cold and not page_cache.drop():
                print("--cold: cannot drop the page cache (needs root); the runs read from the cache")
            base = measure(BASELINE, str(src), str(root / f"copy{k}"))
            if args.cold:
                page_cache.drop()  # evicts the source, and the libraries too: load those back first
                startup = measure(STARTUP)
            extra = ["no-prefetch"] if args.no_prefetch else []
            ours = measure(OURS, str(src), str(root / f"out{k}"), *extra)
            shutil.rmtree(root / f"copy{k}")
            report = json.loads((root / f"out{k}" / "quantization_report.json").read_text())
            rows.append((base, ours, report))  # the split printed below is the fastest run's
            shutil.rmtree(root / f"out{k}")
        base, ours, report = min(rows, key=lambda r: r[1][0])
        out_bytes = report["summary"]["bytes_out"]
        bound = 2 * largest + 300e6
        print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, python {platform.python_version()}")
        print(f"{'':32}{'wall s':>10}{'GB/s in':>10}{'peak RssAnon MB':>18}{'peak RSS MB':>14}")
        for label, (wall, anon, rss) in (
            ("plain read + write (copy)", base),
            ("quantize-model convert", ours),
        ):
            print(f"{label:32}{wall:10.2f}{total / wall / 1e9:10.2f}{anon / 1e6:18.0f}{rss / 1e6:14.0f}")
        wall, anon, rss = startup
        print(f"{'  of which startup (imports)':32}{wall:10.2f}{'':>10}{anon / 1e6:18.0f}{rss / 1e6:14.0f}")
        print(
            f"output: {out_bytes / 1e9:.2f} GB ({8 * out_bytes / (total / 2):.2f} bits per parameter overall)"
        )
        print(f"wall time ratio ours / plain copy: {ours[0] / base[0]:.2f} (target <= 2)")
        print(
            f"wall time ratio excluding start-up (ours - imports-only run) / plain copy: "
            f"{max(ours[0] - startup[0], 0) / base[0]:.2f}"
        )
        print(
            f"peak RssAnon {ours[1] / 1e6:.0f} MB vs bound 2 x largest tensor + 300 MB = "
            f"{bound / 1e6:.0f} MB ({'within' if ours[1] < bound else 'OVER'})"
        )
        timings = report["timings"]
        print(
            "ours, split (s): "
            + ", ".join(
                f"{k.removeprefix('seconds_')} {v:.2f}" for k, v in timings.items() if k.startswith("seconds")
            )
        )
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
