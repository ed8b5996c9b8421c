"""Llama 4 decode: our routed 4-bit experts vs the same folder's experts run densely vs transformers +
bitsandbytes on the same folder vs the bf16 model, batch 1, side by side in one run.

    cd /tmp && python /path/to/bench/bench_llama4.py                       # CPU: a small model
    cd /tmp && python /path/to/bench/bench_llama4.py --device cuda         # GPU: Scout's shapes, 8 layers

Contenders (each ``generate()`` greedy, ``--prompt`` tokens then ``--new``, interleaved, best of
``--repeat``; bench/moe_whole.py's ``_run_mode``):

- ours: ``load_quantized`` of a ``--moe-experts quantize`` NF4 folder, the experts one
  ``QuantLlama4Experts4bit`` per layer (routed experts only: converter/loader/moe_llama4.py); with
  ``--moe-experts keep``, a folder whose experts stay 16-bit, run for the routed experts only
  (``route_sequential``);
- ours, transformers' MoE block: the routed 4-bit experts called with ``Llama4TextMoe``'s E-fold
  ``routed_in`` (before ``route_block`` handed them the routed rows);
- ours dense: the same folder with the experts as transformers builds them pre-quantized
  (``SequentialLlama4TextExperts`` of 4-bit or 16-bit linears, every expert on every token), how our
  loader ran them before the routed layers;
- transformers + bitsandbytes: stock ``from_pretrained`` of the same folder (also per-expert, dense);
- bf16: the model from the config in bf16 (transformers' fused ``Llama4TextExperts``, a bmm over every
  expert).

The checkpoint is random (``random_source.RandomSource``, converted on the fly: no bf16 checkpoint on
disk); the bf16 model is randomly initialised by transformers. Speed only, not quality. Shapes: CPU
``SMALL`` (16 experts, top-1, hidden 1024, 6 layers); CUDA Scout's (hidden 5120, 16 experts of 8192,
shared expert, vocab 202048) with ``--layers`` decoder layers (default 8: 16 G parameters, 32 GB bf16).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from moe_whole import _allocated, _run_mode, _sync
from need_cuda import require_cuda
from random_source import RandomSource

#: Llama 4 Scout's text shapes (every layer MoE: 16 routed experts, top-1, one shared expert).
SCOUT = dict(
    hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384, num_attention_heads=40,
    num_key_value_heads=8, head_dim=128, vocab_size=202048, num_local_experts=16, num_experts_per_tok=1,
    interleave_moe_layer_step=1,
)  # fmt: skip
#: The same ratios on a model two CPU cores decode in tens of milliseconds per token.
SMALL = dict(
    hidden_size=1024, intermediate_size=1024, intermediate_size_mlp=2048, num_attention_heads=16,
    num_key_value_heads=4, head_dim=64, vocab_size=8192, num_local_experts=16, num_experts_per_tok=1,
    interleave_moe_layer_step=1,
)  # fmt: skip


def _config(shapes: dict, layers: int):
    import transformers

    cfg = transformers.Llama4TextConfig(
        **shapes, num_hidden_layers=layers, max_position_embeddings=4096, pad_token_id=0
    )
    cfg.architectures = ["Llama4ForCausalLM"]
    return cfg


def _quantized(folder: Path, cfg, device: str, moe_experts: str) -> tuple[Path, float]:
    """The NF4 folder (experts per ``moe_experts``) of a random checkpoint with ``cfg``'s tensors (once)."""
    if (folder / "config.json").exists():
        return folder, 0.0
    import transformers

    from converter.writer.pipeline import convert

    with torch.device("meta"):
        meta = transformers.Llama4ForCausalLM(cfg)
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}  # fused experts, as on disk
    print(f"converting a random {folder.name} ({sum(map(math.prod, shapes.values())) / 1e9:.1f} G params)")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = RandomSource(cfg.to_dict(), shapes, device=device)
        convert(src, folder, moe_experts=moe_experts, device=device, progress=False, overwrite=True)
    return folder, time.perf_counter() - t0


def _contenders(q: Path, cfg, device: str, moe_experts: str) -> dict:
    import transformers

    import converter.loader.moe_attach as moe_attach
    from converter.loader.model import load_quantized

    def dense():
        # the per-expert linears (4-bit, or 16-bit in a keep folder) stay transformers' dense module
        routed = moe_attach.is_llama4_sequential
        moe_attach.is_llama4_sequential = lambda module: False
        try:
            return load_quantized(q, device=device)
        finally:
            moe_attach.is_llama4_sequential = routed

    def block_unrouted():
        # the routed 4-bit experts called with transformers' E-fold routed_in (before route_block)
        model = load_quantized(q, device=device)
        for layer in model.model.layers:
            vars(layer.feed_forward).pop("forward", None)
        return model

    bits = "4-bit" if moe_experts == "quantize" else "16-bit"

    def bf16():
        # built in bf16 (not float32, then cast: twice the memory, which ran out at 6 Scout layers)
        with torch.device(device):
            torch.manual_seed(0)
            return transformers.Llama4ForCausalLM._from_config(cfg, dtype=torch.bfloat16)

    return {
        f"ours (routed {bits} experts)": lambda: load_quantized(q, device=device),
        **({"ours, transformers' MoE block": block_unrouted} if moe_experts == "quantize" else {}),
        "ours, experts run densely": dense,
        "transformers + bnb (same folder)": lambda: transformers.AutoModelForCausalLM.from_pretrained(
            q, device_map=device
        ),
        "bf16": bf16,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (CPU 6, CUDA 8)")
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    ap.add_argument("--modes", default="eager", help="eager,compiled,graphed[-compiled] (bench/moe_whole.py)")
    ap.add_argument("--only", default=None, help="comma-separated contender prefixes (e.g. ours,bf16)")
    ap.add_argument("--moe-experts", choices=("quantize", "keep"), default="quantize", help="its experts")
    ap.add_argument("--workdir", default="/tmp/llama4-bench")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.device == "cuda":
        require_cuda(__file__)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if "compiled" not in args.modes:
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    layers = args.layers or (8 if args.device == "cuda" else 6)
    cfg = _config(SCOUT if args.device == "cuda" else SMALL, layers)
    name = f"{'scout' if args.device == 'cuda' else 'small'}-{layers}l"
    suffix = "nf4" if args.moe_experts == "quantize" else "nf4-keep"
    q, t_conv = _quantized(Path(args.workdir) / f"llama4-{name}-{suffix}", cfg, args.device, args.moe_experts)
    cpu = f"{platform.machine()} CPU x{args.threads}"
    where = torch.cuda.get_device_name() if args.device == "cuda" else cpu
    print(f"{where}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, Llama 4 {name}, ", end="")
    print(f"converted in {t_conv:.1f} s" if t_conv else "folder reused")
    models, memory = {}, {}
    for label, make in _contenders(q, cfg, args.device, args.moe_experts).items():
        if args.only and not any(label.startswith(p) for p in args.only.split(",")):
            continue
        gc.collect()
        _sync(args.device)
        before = _allocated(args.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models[label] = make().eval()
        _sync(args.device)
        memory[label] = _allocated(args.device) - before
    torch.manual_seed(0)
    ids = torch.randint(100, min(cfg.vocab_size, 8000), (1, args.prompt), device=args.device)
    rows = []
    for mode in [m for m in args.modes.split(",") if m]:
        rows += list(_run_mode(models, mode, ids, args.new, args.repeat, args.device).values())
    bf16 = {r["mode"]: r.get("decode_tok_s") for r in rows if r["contender"] == "bf16"}
    bnb = {r["mode"]: r.get("decode_tok_s") for r in rows if r["contender"].startswith("transformers")}
    print(f"\n## Llama 4 {name} ({suffix}) decode, batch 1, {args.new} new tokens", end=" ")
    print(f"after {args.prompt} (best of {args.repeat})")
    print("| contender | mode | decode tok/s | vs bf16 | vs transformers + bnb | memory (GB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        tok = r.get("decode_tok_s")
        ratio = [f"{tok / b:.2f}x" if tok and b else "n/a" for b in (bf16.get(r["mode"]), bnb.get(r["mode"]))]
        gb = memory[r["contender"]] / 1e9 if args.device == "cuda" else float("nan")
        shown = f"{tok}" if tok else r.get("error", "n/a")
        print(f"| {r['contender']} | {r['mode']} | {shown} | {ratio[0]} | {ratio[1]} | {gb:.2f} |")
    if args.json:
        result = {"rows": rows, "memory_bytes": memory, "device": where}
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
