"""End-to-end conversion of a generated multi-GB checkpoint: --device cuda vs the CPU path, same host.

    python bench/bench_cuda_convert.py --workdir /tmp/qm_e2e [--layers 6]

1. Writes a Llama-shaped bf16 checkpoint (hidden 4096, intermediate 11008; about 0.4 GB a layer).
2. Times ``converter.writer.pipeline.convert`` with device="cpu" and device="cuda", alternating over --rounds
   and keeping each one's best (page cache warm for both: the source is read once before timing),
   checks that both outputs hold identical shards, and prints
   each run's time split from its quantization_report.json: reading (disk / mmap -> tensor, casts),
   quantizing (host time, reads excluded), writing shards; for cuda also the GPU quantizer's own
   split: staging into pinned memory (host memcpy), upload (PCIe, CUDA events), kernels, download
   (PCIe), host time blocked waiting for results. Reads, uploads, kernels and downloads overlap (two
   tensors in flight), so the parts add up to more than the wall time when the overlap works.
3. Streams the same tensors through ``converter.quantize.cuda_pipeline.CudaQuantizer`` alone (no shard
   writing) and prints the same split, and the CPU quantizer over them for comparison.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from need_cuda import require_cuda

from converter.quantize import cuda_pipeline
from formats.quant_types import QuantType

HIDDEN, INTER, VOCAB = 4096, 11008, 32000


def write_checkpoint(folder: Path, layers: int) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": VOCAB,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    g = torch.Generator().manual_seed(0)
    params = 0
    weight_map = {}
    for i in range(layers):
        t = {}
        p = f"model.layers.{i}."
        for name, shape in (
            ("self_attn.q_proj", (HIDDEN, HIDDEN)),
            ("self_attn.k_proj", (HIDDEN, HIDDEN)),
            ("self_attn.v_proj", (HIDDEN, HIDDEN)),
            ("self_attn.o_proj", (HIDDEN, HIDDEN)),
            ("mlp.gate_proj", (INTER, HIDDEN)),
            ("mlp.up_proj", (INTER, HIDDEN)),
            ("mlp.down_proj", (HIDDEN, INTER)),
        ):
            t[p + name + ".weight"] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        t[p + "input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        t[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        fname = f"model-{i + 1:05d}-of-{layers + 1:05d}.safetensors"
        save_file(t, folder / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(t, fname))
        params += sum(v.numel() for v in t.values())
    t = {
        "model.embed_tokens.weight": (torch.randn(VOCAB, HIDDEN, generator=g) * 0.02).to(torch.bfloat16),
        "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
        "lm_head.weight": (torch.randn(VOCAB, HIDDEN, generator=g) * 0.02).to(torch.bfloat16),
    }
    fname = f"model-{layers + 1:05d}-of-{layers + 1:05d}.safetensors"
    save_file(t, folder / fname, metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(t, fname))
    params += sum(v.numel() for v in t.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": params * 2}, "weight_map": weight_map}, indent=1)
    )
    return params


def read_all(folder: Path) -> None:
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass


def shard_hashes(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.glob("*.safetensors"))}


def report_split(out: Path) -> str:
    """The time split of one conversion, from the quantization_report.json it wrote."""
    t = json.loads((out / "quantization_report.json").read_text())["timings"]
    parts = t["seconds_read"] + t["seconds_quantize"] + t["seconds_write"]
    text = (
        f"read {t['seconds_read']:.2f} s, quantize {t['seconds_quantize']:.2f} s, "
        f"write {t['seconds_write']:.2f} s, rest {t['seconds_total'] - parts:.2f} s "
        "(plan, selection, index with sha256, config)"
    )
    d = t.get("device")
    if d:
        text += (
            f"\n    GPU quantizer on {d['device']}, {d['tensors']} tensors, {d['bytes_in'] / 1e9:.2f} GB up: "
            f"stage {d['seconds_stage']:.2f} s, upload {d['seconds_upload']:.2f} s "
            f"({d['bytes_in'] / max(d['seconds_upload'], 1e-9) / 1e9:.1f} GB/s), "
            f"kernels {d['seconds_kernels']:.3f} s, download {d['seconds_download']:.2f} s, "
            f"wait {d['seconds_wait']:.2f} s"
        )
    return text


def linear_tensors(folder: Path):
    """(name, bf16 tensor) of every linear weight, read from the shards (mmap), with read time."""
    stats = {"seconds_read": 0.0}

    def gen():
        for f in sorted(folder.glob("model-*.safetensors")):
            with safe_open(f, framework="pt") as st:
                for k in st.keys():
                    if k.endswith("proj.weight"):
                        t0 = time.perf_counter()
                        x = st.get_tensor(k)
                        stats["seconds_read"] += time.perf_counter() - t0
                        yield k, x

    return gen(), stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qm_e2e"))
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2, help="conversions per device, alternating")
    args = parser.parse_args()
    require_cuda(__file__)
    from converter.plan import selection
    from converter.writer.pipeline import convert

    try:  # the device image may carry an older transformers than the selection code needs
        from transformers.core_model_loading import apply_converters  # noqa: F401
    except ImportError:
        selection.transformers_usable = lambda: False
        print("note: this transformers is too old for skeleton selection; using the allowlist")

    src = args.workdir / "src"
    shutil.rmtree(args.workdir, ignore_errors=True)
    params = write_checkpoint(src, args.layers)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    print(f"checkpoint: {params / 1e9:.2f} G params, {size / 1e9:.2f} GB bf16, {args.layers} layers")
    read_all(src)
    from converter.kernels import bnb4bit_cuda as kernels_cuda

    usable, why = kernels_cuda.cuda_status()
    gpu = torch.cuda.get_device_name(0) if usable else f"none ({why})"
    print(f"torch threads {torch.get_num_threads()}, GPU {gpu}")
    devices = ("cpu", "cuda") if usable else ("cpu",)
    results: dict[str, float] = {}
    # Alternate the devices over rounds and keep each one's best: the first conversion in a process
    # also pays one-time costs (importing transformers for the selection skeleton, first allocations).
    for rnd in range(args.rounds):
        for device in devices:
            out = args.workdir / f"out-{device}"
            t0 = time.perf_counter()
            convert(src, out, device=device, progress=False, overwrite=True)
            wall = time.perf_counter() - t0
            results[device] = min(wall, results.get(device, wall))
            print(
                f"round {rnd + 1}: convert --device {device}: {wall:.2f} s ({size / wall / 1e9:.2f} GB/s in)"
            )
            print(f"  split: {report_split(out)}")
    for device in devices:
        best = results[device]
        print(f"best convert --device {device}: {best:.2f} s ({size / best / 1e9:.2f} GB/s in)")
    if usable:
        same = shard_hashes(args.workdir / "out-cpu") == shard_hashes(args.workdir / "out-cuda")
        print(f"identical shards cpu vs cuda: {same}; speedup x{results['cpu'] / results['cuda']:.2f}")

    # The GPU quantizer alone over the same tensors: where the time goes.
    quantizers = [("cpu", cuda_pipeline.CpuQuantizer(QuantType.NF4, 64, nested=True))]
    if usable:
        quantizers.insert(0, ("cuda", cuda_pipeline.CudaQuantizer(QuantType.NF4, 64, nested=True)))
    for label, q in quantizers:
        items, rstats = linear_tensors(src)
        t0 = time.perf_counter()
        n = 0
        for _, r in q.quantize_many(items):
            n += r.packed.numel() * 2
        wall = time.perf_counter() - t0
        s = q.stats
        split = (
            f"read {rstats['seconds_read']:.2f} s, stage {s.seconds_stage:.2f} s, "
            f"upload {s.seconds_upload:.2f} s, kernels {s.seconds_kernels:.3f} s, "
            f"download {s.seconds_download:.2f} s, wait {s.seconds_wait:.2f} s"
        )
        print(
            f"quantizer {label}: {n / 1e9:.2f} Gparam, {wall:.2f} s ({n / wall / 1e9:.2f} Gparam/s); {split}"
        )


if __name__ == "__main__":
    main()
