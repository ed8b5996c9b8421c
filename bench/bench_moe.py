"""MoE: bits per parameter, conversion speed (MoE vs dense), and CPU decode tok/s (ours vs bf16).

    cd /tmp && python /path/to/bench/bench_moe.py [--workdir /tmp/moe-bench] [--layers 2] [--tokens 32]

1. Size: a checkpoint with Qwen3-30B-A3B's real shapes (hidden 2048, 128 experts of intermediate 768,
   32/4 heads of 128, vocab 151936, untied head) but ``--layers`` decoder layers, random bf16 weights,
   converted with ``--moe-experts quantize`` (NF4, blocksize 64, nested). Bits per parameter are
   measured on that folder and extrapolated to 48 layers from the measured per-layer and fixed bytes.
2. Conversion speed: the same MoE checkpoint and a dense Llama-shaped checkpoint of about the same size
   (hidden 2048, intermediate 8192) converted side by side, interleaved, best of --repeat; MB/s of input.
3. Decode: a small random Qwen3-MoE (hidden 1024, 64 experts of intermediate 384, top-8, 6 layers,
   vocab 8192: its bf16 head is 10% of the weights read per token, as Qwen3-30B-A3B's 311M-param head
   is of its 3.0B read per token) generating --tokens tokens greedily at batch 1 on CPU: our
   load_quantized (4-bit experts, grouped GEMV) vs the bf16 model in transformers with its default
   experts implementation and with "eager". ``--family nemotron_h``: a small NemotronH instead
   (experts without a gate, relu2; ``random_small_nemotron_h``).
4. ``--device cuda`` (replaces 1-3; ``--whole`` runs it on the CPU, a smoke run): the whole model
   (``moe_whole.py``): Qwen3-30B-A3B's real shapes with ``--layers`` decoder layers (default 48, the real
   model) and ``--vocab`` (default 151936), converted from random tensors made on the fly
   (``random_source.py``: no 61 GB bf16 checkpoint on disk), loaded with ``load_quantized`` vs the bf16
   model built by transformers from the config on the device; memory, MoE blocks' time per token, and
   generate() tok/s at batch 1 (``--prompt`` tokens, ``--new`` new ones), eager and compiled
   (``--modes``), interleaved, best of ``--repeat``; markdown table on stdout, ``--json`` file.

    cd /tmp && python /path/to/bench/bench_moe.py --device cuda --json /tmp/moe_whole.json
    cd /tmp && python /path/to/bench/bench_moe.py --device cuda --layers 16 --repeat 2  # shorter run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
import warnings
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from need_cuda import require_cuda
from safetensors.torch import save_file

#: --clock cpu: decode timed in process CPU seconds (run under `taskset -c N` with --threads 1, so the
#: kernels' pool and torch use one core): robust on a machine other jobs share.
CPU_CLOCK = False
QWEN3_30B = dict(hidden=2048, inter=768, experts=128, heads=32, kv=4, head_dim=128, vocab=151936, layers=48)


def _qwen3_moe_tensors(layers: int, vocab: int | None = None) -> dict[str, tuple[int, ...]]:
    c = {**QWEN3_30B, "vocab": vocab or QWEN3_30B["vocab"]}
    h, i, e = c["hidden"], c["inter"], c["experts"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c["vocab"], h)}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (c["heads"] * c["head_dim"], h)
        shapes[p + "self_attn.k_proj.weight"] = (c["kv"] * c["head_dim"], h)
        shapes[p + "self_attn.v_proj.weight"] = (c["kv"] * c["head_dim"], h)
        shapes[p + "self_attn.o_proj.weight"] = (h, c["heads"] * c["head_dim"])
        shapes[p + "self_attn.q_norm.weight"] = (c["head_dim"],)
        shapes[p + "self_attn.k_norm.weight"] = (c["head_dim"],)
        shapes[p + "mlp.gate.weight"] = (e, h)
        for x in range(e):
            shapes[p + f"mlp.experts.{x}.gate_proj.weight"] = (i, h)
            shapes[p + f"mlp.experts.{x}.up_proj.weight"] = (i, h)
            shapes[p + f"mlp.experts.{x}.down_proj.weight"] = (h, i)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (c["vocab"], h)
    return shapes


def _write_random(folder: Path, shapes: dict[str, tuple[int, ...]], config: dict, seed: int = 0) -> int:
    """Random bf16 tensors in 2 GB shards; returns total parameters."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    size, n, weight_map, files = 0, 0, {}, []

    def flush() -> None:
        nonlocal shard, size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        files.append(name)
        shard, size = {}, 0

    for key, shape in shapes.items():
        t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        shard[key] = t
        size += t.numel() * 2
        n += t.numel()
        if size > 2 * 10**9:
            flush()
    if shard:
        flush()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return n


def _qwen3_config(layers: int, vocab: int | None = None) -> dict:
    c = {**QWEN3_30B, "vocab": vocab or QWEN3_30B["vocab"]}
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": c["hidden"],
        "intermediate_size": 6144,
        "moe_intermediate_size": c["inter"],
        "num_experts": c["experts"],
        "num_experts_per_tok": 8,
        "num_hidden_layers": layers,
        "num_attention_heads": c["heads"],
        "num_key_value_heads": c["kv"],
        "head_dim": c["head_dim"],
        "vocab_size": c["vocab"],
        "decoder_sparse_step": 1,
        "norm_topk_prob": True,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }


def _dense_shapes(layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    h, i = 2048, 8192
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        for proj in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{proj}_proj.weight"] = (h, h)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (vocab, h)
    return shapes


def _dense_config(layers: int, vocab: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": layers,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }


def _convert(src: Path, out: Path, **kw) -> tuple[float, int, object]:
    from converter.writer.pipeline import convert

    shutil.rmtree(out, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        r = convert(src, out, progress=False, **kw)
    return time.perf_counter() - t0, r.bytes_in, r


def size_and_speed(work: Path, layers: int, repeat: int) -> None:
    moe_src = work / "qwen3-30b-shape"
    if not (moe_src / "config.json").exists():
        _write_random(moe_src, _qwen3_moe_tensors(layers), _qwen3_config(layers))
    moe_bytes = sum(f.stat().st_size for f in moe_src.glob("*.safetensors"))
    # a dense model of about the same bytes: 2048 hidden, 8192 intermediate (~62.9M params per layer)
    dense_layers = max(1, round((moe_bytes / 2 - 2 * 151936 * 2048) / (4 * 2048 * 2048 + 3 * 2048 * 8192)))
    dense_src = work / "dense"
    if not (dense_src / "config.json").exists():
        _write_random(dense_src, _dense_shapes(dense_layers, 151936), _dense_config(dense_layers, 151936))
    best = {"moe": float("inf"), "dense": float("inf")}
    for _ in range(repeat):  # interleaved A/B, best of N
        t, nbytes_moe, _result = _convert(moe_src, work / "moe-q", moe_experts="quantize")
        best["moe"] = min(best["moe"], t)
        t, nbytes_dense, _ = _convert(dense_src, work / "dense-q")
        best["dense"] = min(best["dense"], t)
    print(f"\n## conversion speed (best of {repeat}, interleaved)")
    print("| checkpoint | input | seconds | MB/s |")
    print("|---|---|---|---|")
    for name, nb in (
        (f"MoE (Qwen3-30B-A3B shapes, {layers} layers)", nbytes_moe),
        (f"dense (Llama, {dense_layers} layers)", nbytes_dense),
    ):
        key = "moe" if name.startswith("MoE") else "dense"
        print(f"| {name} | {nb / 1e9:.2f} GB | {best[key]:.1f} | {nb / 1e6 / best[key]:.0f} |")

    from converter.tools.inspection import inspect_path

    r = inspect_path(work / "moe-q")
    print(f"\n## size ({layers} layers measured)")
    print(f"bits/param overall {r.bits_per_param:.3f}, quantized weights {r.quantized_bits_per_param:.3f}")
    # extrapolate: fixed part (embeddings, head, final norm) + per-layer part x 48
    fixed_params = 2 * QWEN3_30B["vocab"] * QWEN3_30B["hidden"] + QWEN3_30B["hidden"]
    fixed_bytes = fixed_params * 2
    total_bytes = r.bytes_quantized + r.bytes_kept
    total_params = r.params_quantized + r.params_kept
    per_layer_bytes = (total_bytes - fixed_bytes) / layers
    per_layer_params = (total_params - fixed_params) / layers
    bits48 = 8 * (fixed_bytes + 48 * per_layer_bytes) / (fixed_params + 48 * per_layer_params)
    print(
        f"extrapolated to 48 layers: {(fixed_params + 48 * per_layer_params) / 1e9:.2f} B params, "
        f"{(fixed_bytes + 48 * per_layer_bytes) / 1e9:.2f} GB, {bits48:.3f} bits/param"
    )


def _save_random(src: Path, cls_name: str, cfg, router: str) -> Path:
    """A random bf16 ``cls_name`` of ``cfg`` saved at ``src``, its routers (parameters ending in
    ``router``) widened so that top-k varies from token to token."""
    import transformers

    cfg.architectures = [cls_name]
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(cfg).to(torch.bfloat16)
    for n, p in model.named_parameters():
        if n.endswith(router):
            torch.nn.init.normal_(p, std=0.5)  # varied routing from token to token
    model.save_pretrained(src)
    return src


def random_small_moe(src: Path, **config: int) -> Path:
    """A random bf16 Qwen3-MoE saved at ``src`` (once), its routers widened so top-k varies per token."""
    import transformers

    if (src / "config.json").exists():
        return src
    cfg = transformers.Qwen3MoeConfig(
        decoder_sparse_step=1, norm_topk_prob=True, tie_word_embeddings=False, **config
    )
    return _save_random(src, "Qwen3MoeForCausalLM", cfg, "mlp.gate.weight")


def random_small_nemotron_h(src: Path) -> Path:
    """A random bf16 NemotronH saved at ``src`` (once): 6 attention + 6 MoE layers (no Mamba layer: the
    experts are what differs), hidden 1024, 64 gateless relu2 experts of 384, top-6 (as Nemotron-3
    Nano routes), a shared expert of 768, vocab 8192; routers widened so top-k varies per token."""
    import transformers

    if (src / "config.json").exists():
        return src
    cfg = transformers.NemotronHConfig(
        vocab_size=8192, hidden_size=1024, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
        intermediate_size=3072, moe_intermediate_size=384, moe_shared_expert_intermediate_size=768,
        n_routed_experts=64, num_experts_per_tok=6, n_group=1, topk_group=1, tie_word_embeddings=False,
        layers_block_type=["full_attention", "moe"] * 6, max_position_embeddings=512,
    )  # fmt: skip
    return _save_random(src, "NemotronHForCausalLM", cfg, "mixer.gate.weight")


def decode(work: Path, tokens: int, repeat: int, compiled: bool = False, family: str = "qwen3_moe") -> None:
    import transformers

    from converter.loader.model import load_quantized

    if family == "nemotron_h":  # experts without a gate (converter/loader/moe_ungated.py)
        src = random_small_nemotron_h(work / "small-nemotron-h")
    else:
        src = random_small_moe(
            work / "small-moe-6l", hidden_size=1024, intermediate_size=3072, moe_intermediate_size=384,
            num_experts=64, num_experts_per_tok=8, num_hidden_layers=6, num_attention_heads=16,
            num_key_value_heads=4, head_dim=64, vocab_size=8192, max_position_embeddings=512,
        )  # fmt: skip
    q = src.with_name(src.name + "-q")
    if not (q / "config.json").exists():
        _convert(src, q, moe_experts="quantize")
    ids = torch.tensor([[1, 9, 1031, 314, 2718, 42, 7, 100]])
    kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = load_quantized(q)
        models = {  # name -> (model, extra generate() kwargs, static cache to reset or None)
            "ours (4-bit experts, load_quantized)": (ours, {}, None),
            "bf16, transformers default experts": (
                transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16),
                {},
                None,
            ),
            "bf16, experts_implementation=eager": (
                transformers.AutoModelForCausalLM.from_pretrained(
                    src, dtype=torch.bfloat16, experts_implementation="eager"
                ),
                {},
                None,
            ),
        }
        if compiled:  # each side's best compiled mode (as bench_cpu_decode_ab.py does for SmolLM2)
            import bench_generate as bg

            from converter.loader.decode import graphed_greedy

            models["ours, graphed_greedy + compiled step"] = (
                ours, {"custom_generate": graphed_greedy, "compile_step": True}, None
            )  # fmt: skip
            bf16c = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
            bg.compile_decode(bf16c, "cpu", fullgraph=False)
            cache = bg.static_cache(bf16c, ids.shape[1] + tokens + 1)
            models["bf16 default experts, compiled step + static cache"] = (
                bf16c, {"disable_compile": True, "cache": cache}, cache
            )  # fmt: skip
    best = dict.fromkeys(models, float("inf"))
    clock = time.process_time if CPU_CLOCK else time.perf_counter

    def run(m, extra: dict, cache, new: int) -> float:
        if cache is not None:
            cache.reset()
        t0 = clock()
        m.generate(ids, **{**kw, "max_new_tokens": new, "min_new_tokens": new}, **extra)
        return clock() - t0

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m, extra, cache in models.values():
            m.eval()
            run(m, extra, cache, 2 if not compiled else tokens)  # warm-up (compiled: at the timed length)
        if compiled:
            from torch._dynamo.utils import counters

            assert counters["stats"]["unique_graphs"] > 0, "dynamo compiled nothing: TORCHDYNAMO_DISABLE?"
        for _ in range(repeat):  # interleaved, best of N
            for name, (m, extra, cache) in models.items():
                best[name] = min(best[name], run(m, extra, cache, tokens))
    base = tokens / best["bf16, transformers default experts"]
    print(f"\n## {family} decode, batch 1, {tokens} new tokens after 8 (best of {repeat}, interleaved)")
    print(f"load average at the end: {os.getloadavg()}")
    print("| model | tok/s | vs bf16 default |")
    print("|---|---|---|")
    for name, t in best.items():
        print(f"| {name} | {tokens / t:.1f} | {tokens / t / base:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/moe-bench")
    ap.add_argument("--layers", type=int, default=None, help="size: 2; --device cuda / --whole: 48")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=("size", "decode"), default=None)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--vocab", type=int, default=QWEN3_30B["vocab"], help="--device cuda / --whole")
    ap.add_argument("--whole", action="store_true", help="the whole-model benchmark on --device (cpu: smoke)")
    ap.add_argument("--prompt", type=int, default=512, help="--device cuda / --whole: prompt tokens")
    ap.add_argument("--new", type=int, default=128, help="--device cuda / --whole: new tokens")
    ap.add_argument(
        "--modes", default="eager,compiled", help="--device cuda / --whole: eager,compiled,graphed[-compiled]"
    )
    ap.add_argument("--json", default=None, help="--device cuda / --whole: write the results here")
    ap.add_argument("--compiled", action="store_true", help="decode: also each side's compiled mode")
    ap.add_argument(
        "--family", choices=("qwen3_moe", "nemotron_h"), default="qwen3_moe",
        help="decode: the small model's family (nemotron_h: experts without a gate)",
    )  # fmt: skip
    args = ap.parse_args()
    if args.device == "cuda":
        require_cuda(__file__)
    global CPU_CLOCK
    CPU_CLOCK = args.clock == "cpu"
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cpus = len(os.sched_getaffinity(0))
    day = time.strftime("%Y-%m-%d")
    print(f"{platform.machine()}, {cpus} CPUs usable, threads={args.threads}, clock={args.clock}, ", end="")
    print(f"torch {torch.__version__}, {day}")
    if args.device == "cuda" or args.whole:
        from moe_whole import whole_model_bench

        os.environ.pop("TORCHDYNAMO_DISABLE", None)  # the compiled mode compiles (set above for 1-3 only)

        layers = args.layers or QWEN3_30B["layers"]
        config = {**_qwen3_config(layers, args.vocab), "max_position_embeddings": 4096}
        whole_model_bench(
            work, config, _qwen3_moe_tensors(layers, args.vocab), device=args.device, prompt=args.prompt,
            new=args.new, repeat=args.repeat, modes=[m for m in args.modes.split(",") if m],
            json_path=args.json,
        )  # fmt: skip
        return
    args.layers = args.layers or 2
    if args.only in (None, "decode"):
        if args.compiled:
            os.environ.pop("TORCHDYNAMO_DISABLE", None)  # set above for 1-3; read at the first compile
        decode(work, args.tokens, args.repeat, args.compiled, args.family)
    if args.only in (None, "size"):
        size_and_speed(work, args.layers, args.repeat)


if __name__ == "__main__":
    main()
