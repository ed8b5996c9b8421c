"""Loading a pre-quantized checkpoint on CPU, and batch-1 GEMV through the layer, side by side.

    python bench/bench_load.py [--model FOLDER] [--workdir .cache/bench] [--repeat 3]

--model defaults to SmolLM2-135M, built once in $QM_SAMPLES_DIR, else ./.cache/samples (docs/benchmarks.md).

1. Load time = from the call to the end of the first forward (8 tokens), each run in a fresh
   subprocess that has already imported torch/transformers (imports are not timed):
   - read: every file of the folder read once into a buffer (the floor: the bytes must be read);
   - ours: ``converter.load_quantized(folder, verify=False)``, ``verify=True`` (the index's chunk
     digests: xxh3_128 where it records them, hashed in parallel while the model builds) and
     ``verify="sha256"`` (the sha256 chunk digests);
   - transformers + bitsandbytes: ``AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")``.
   Cold = the page cache dropped before the run (``/proc/sys/vm/drop_caches`` when writable, else
   ``posix_fadvise(DONTNEED)`` on every file of the folder); warm = the folder read once before.
   Memory after the forward: RssAnon and RssFile of the process minus what it held before the call.
2. GEMV: ``Linear4bit`` forward for one bf16 token (the fused GEMV, nested absmax decoded inline)
   vs ``F.linear`` with the bf16 weight, vs bitsandbytes' ``Linear4bit`` forward in eval mode, for
   4096x4096 and 11008x4096 (median of --gemv-repeat calls after a warm-up).

The folder is our NF4 conversion (blocksize 64, nested) of --model, made once in --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import page_cache

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def smollm2_sample() -> Path:
    """SmolLM2-135M where every benchmark takes it (built once from the PyPI-shipped GGUF): in
    $QM_SAMPLES_DIR, else ./.cache/samples of the current folder (docs/benchmarks.md)."""
    from converter.tools import samples

    return samples.smollm2(Path(os.environ.get("QM_SAMPLES_DIR", samples.DEFAULT_SAMPLES_DIR)))


CASES = ("read", "ours", "ours+verify", "ours+verify-sha256", "transformers+bnb")
VERIFY = {"ours": False, "ours+verify": True, "ours+verify-sha256": "sha256"}
IDS = [[1, 9, 1031, 314, 2718, 42, 7, 100]]


# ------------------------------------------------------------------------------------------------
# child: one measurement in a fresh process


def _rss() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def child(case: str, folder: Path) -> dict:
    import warnings

    import torch

    warnings.simplefilter("ignore")
    ids = torch.tensor(IDS)
    loaded = None
    if case == "read":
        files = sorted(p for p in folder.iterdir() if p.is_file())
        buf = bytearray(16 << 20)
        before = _rss()
        start = time.perf_counter()
        for p in files:
            with open(p, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
        loaded = time.perf_counter()
    else:
        import bitsandbytes  # noqa: F401
        import transformers

        import converter.loader.model  # noqa: F401

        # Imports are not timed, for either side: the model class's module is imported up front.
        architecture = json.loads((folder / "config.json").read_text())["architectures"][0]
        getattr(transformers, architecture)
        before = _rss()
        start = time.perf_counter()
        if case.startswith("ours"):
            from converter import load_quantized

            model = load_quantized(folder, verify=VERIFY[case])
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
        loaded = time.perf_counter()
        with torch.no_grad():
            model(ids)
    end = time.perf_counter()
    after = _rss()
    return {
        "load": loaded - start,
        "seconds": end - start,
        "rss_anon": after["RssAnon"] - before["RssAnon"],
        "rss_file": after["RssFile"] - before["RssFile"],
    }


# ------------------------------------------------------------------------------------------------
# parent


def run_child(case: str, folder: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", case, str(folder)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def prepare(model: Path, workdir: Path) -> Path:
    folder = workdir / f"{model.name}-nf4"
    if not (folder / "model.safetensors.index.json").is_file():
        from converter import convert

        # The SmolLM2 sample was rebuilt from GGUF and its config.json still names the gguf
        # quantization; its safetensors weights are plain bf16. Convert a copy without that entry.
        source = workdir / f"{model.name}-src"
        source.mkdir(parents=True, exist_ok=True)
        for p in model.iterdir():
            target = source / p.name
            if p.name == "config.json":
                config = json.loads(p.read_text())
                config.pop("quantization_config", None)
                target.write_text(json.dumps(config, indent=2))
            elif not target.exists():
                target.symlink_to(p.resolve())
        convert(source, folder, progress=False, overwrite=True)
    return folder


def synthetic_llama(folder: Path, layers: int, hidden: int) -> Path:
    """A random bf16 Llama checkpoint (intermediate = 2.75 x hidden, vocab 32000), written tensor by
    tensor so it never sits in memory whole."""
    import torch
    from safetensors.torch import save_file

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    inter, vocab, heads = int(hidden * 2.75) // 64 * 64, 32000, hidden // 128
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16",
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    g = torch.Generator().manual_seed(0)
    weight_map = {}

    def randn(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    outer = {
        "model.embed_tokens.weight": randn(vocab, hidden),
        "model.norm.weight": torch.ones(hidden).bfloat16(),
        "lm_head.weight": randn(vocab, hidden),
    }
    save_file(outer, folder / "model-outer.safetensors", metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(outer, "model-outer.safetensors"))
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors = {
            f"{p}.input_layernorm.weight": torch.ones(hidden).bfloat16(),
            f"{p}.post_attention_layernorm.weight": torch.ones(hidden).bfloat16(),
            **{f"{p}.self_attn.{n}_proj.weight": randn(hidden, hidden) for n in "qkvo"},
            f"{p}.mlp.gate_proj.weight": randn(inter, hidden),
            f"{p}.mlp.up_proj.weight": randn(inter, hidden),
            f"{p}.mlp.down_proj.weight": randn(hidden, inter),
        }
        name = f"model-layer{i:03d}.safetensors"
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


def bench_load(folder: Path, repeat: int) -> tuple[dict, str]:
    results: dict = {}
    method = ""
    for cache in ("cold", "warm"):
        for case in CASES:
            runs = []
            for _ in range(repeat):
                if cache == "cold":
                    method = page_cache.drop(folder)
                else:
                    page_cache.warm(folder)
                runs.append(run_child(case, folder))
            results[(case, cache)] = {
                "load": statistics.median(r["load"] for r in runs),
                "seconds": statistics.median(r["seconds"] for r in runs),
                "rss_anon": statistics.median(r["rss_anon"] for r in runs),
                "rss_file": statistics.median(r["rss_file"] for r in runs),
            }
    return results, method


def bench_gemv(repeat: int) -> list[tuple[str, float, float, float]]:
    import bitsandbytes as bnb
    import torch
    import torch.nn.functional as F

    from converter.kernels import bnb4bit as kernels
    from converter.loader.module import Linear4bit
    from formats.quant_types import QuantType
    from formats.record import QuantizedTensor

    def median(fn) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    rows = []
    torch.manual_seed(0)
    for out_f, in_f in ((4096, 4096), (11008, 4096)):
        w = (torch.randn(out_f, in_f) * 0.02).to(torch.bfloat16)
        packed, absmax = kernels.quantize_4bit(w, blocksize=64, quant_type=QuantType.NF4)
        record = QuantizedTensor.from_kernel_outputs(
            "w",
            (out_f, in_f),
            "bfloat16",
            QuantType.NF4,
            64,
            packed,
            absmax,
            nested=kernels.quantize_nested(absmax),
        )
        ours = Linear4bit.from_record(record).eval()
        theirs = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        stats = {k: v for k, v in ours.state_dict().items() if k != "weight"}
        theirs.weight = bnb.nn.Params4bit.from_prequantized(
            ours.weight.data, stats, device="cpu", module=theirs
        )
        theirs.eval()
        x = torch.randn(1, in_f).to(torch.bfloat16)
        with torch.no_grad():
            t_ours = median(lambda ours=ours, x=x: ours(x))
            t_dense = median(lambda x=x, w=w: F.linear(x, w))
            t_bnb = median(lambda theirs=theirs, x=x: theirs(x))
        rows.append((f"{out_f}x{in_f}", t_ours, t_dense, t_bnb))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a bf16 folder (default: SmolLM2-135M, see above)")
    parser.add_argument("--workdir", type=Path, default=REPO / ".cache/bench")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--synthetic", metavar="LAYERS,HIDDEN", default=None,
        help="bench a random bf16 Llama of this size instead of --model (e.g. 12,2048: 0.75 B params)",
    )  # fmt: skip
    parser.add_argument("--skip-gemv", action="store_true", help="only the load benchmark")
    parser.add_argument("--gemv-repeat", type=int, default=50)
    parser.add_argument("--child", nargs=2, metavar=("CASE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]))))
        return

    import torch

    model = args.model
    if not args.synthetic and model is None:
        model = smollm2_sample()
    if args.synthetic:
        layers, hidden = (int(v) for v in args.synthetic.split(","))
        model = synthetic_llama(args.workdir / f"llama-{layers}x{hidden}", layers, hidden)
    folder = prepare(model, args.workdir)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"checkpoint: {folder} ({size / 1e6:.1f} MB, our NF4 conversion of {model.name})\n")

    results, method = bench_load(folder, args.repeat)
    print(f"Load = call -> end of first forward (8 tokens); median of {args.repeat}; cold cache via {method}")
    print("(load only = call -> model returned, before the forward)")
    header = f"{'case':<20}{'cold s':>9}{'warm s':>9}{'cold load-only':>16}{'warm load-only':>16}"
    print(header + f"{'RssAnon MB':>12}{'RssFile MB':>12}")
    for case in CASES:
        cold, warm = results[(case, "cold")], results[(case, "warm")]
        print(
            f"{case:<20}{cold['seconds']:>9.3f}{warm['seconds']:>9.3f}{cold['load']:>16.3f}{warm['load']:>16.3f}"
            f"{warm['rss_anon'] / 1e6:>12.1f}{warm['rss_file'] / 1e6:>12.1f}"
        )
    for cache in ("cold", "warm"):
        ours = results[("ours", cache)]["seconds"]
        print(
            f"{cache}: transformers+bnb / ours = "
            f"{results[('transformers+bnb', cache)]['seconds'] / ours:.1f}x, "
            f"ours / read = {ours / results[('read', cache)]['seconds']:.2f}x, "
            f"verify cost = {results[('ours+verify', cache)]['seconds'] - ours:.3f} s "
            f"(sha256: {results[('ours+verify-sha256', cache)]['seconds'] - ours:.3f} s)"
        )

    if args.skip_gemv:
        return
    print(f"\nBatch-1 bf16 GEMV (median of {args.gemv_repeat}, {torch.get_num_threads()} threads)")
    print(f"{'shape':<12}{'ours us':>10}{'bf16 F.linear us':>18}{'bnb Linear4bit us':>19}{'bf16/ours':>11}")
    for shape, t_ours, t_dense, t_bnb in bench_gemv(args.gemv_repeat):
        print(
            f"{shape:<12}{t_ours * 1e6:>10.0f}{t_dense * 1e6:>18.0f}{t_bnb * 1e6:>19.0f}"
            f"{t_dense / t_ours:>11.2f}"
        )


if __name__ == "__main__":
    main()
