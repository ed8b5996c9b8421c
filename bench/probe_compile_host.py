"""Host time of one call of a ``torch.compile``'d forward with the graph itself replaced by a no-op:
dynamo's guard checks and the AOT wrappers, which a compiled decode step pays on every token.

A Qwen3-MoE model of tiny widths and ``--layers`` layers (random bf16, saved once under ``--workdir``),
converted with ``--moe-experts quantize``, is loaded by ``load_quantized`` and by transformers (bf16);
each forward (one token, no cache) is compiled fullgraph through aot_autograd with a compiler that
returns the graph's outputs without running it, so what is timed is everything around the graph.
Ours runs twice: plain ``torch.compile`` and with ``converter.loader.compile_options()`` (no tensor
guards on the 4-bit layers' prepared tensors). Each row also counts the compiled call's guards: dynamo's
C++ leaf guards, and the Python ``a is b`` checks of its aliasing guard (one lambda checking every pair
of sources that reached one object; each check walks both sources). ``--fused-groups`` launches q/k/v
together on the CPU too (``converter.loader.siblings``: CUDA only by default), as a CUDA step traces.

    cd /tmp && python /path/to/bench/probe_compile_host.py --layers 48 [--fused-groups]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch


def build(folder: Path, layers: int) -> tuple[Path, Path]:
    """(bf16 folder, quantized folder) of the random model, made once."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from converter.writer.pipeline import convert

    bf16, quantized = folder / "bf16", folder / "q"
    if not (bf16 / "config.json").exists():
        config = Qwen3MoeConfig(
            hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=32, num_experts_per_tok=8,
            vocab_size=1024, max_position_embeddings=512,
        )  # fmt: skip
        torch.manual_seed(0)
        Qwen3MoeForCausalLM(config).to(torch.bfloat16).save_pretrained(bf16)
    if not (quantized / "config.json").exists():
        convert(str(bf16), str(quantized), moe_experts="quantize")
    return bf16, quantized


def guard_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(leaf guards, aliasing checks) of the compiled ``model.forward``'s one cache entry."""
    code = type(model).forward.__code__
    root = torch._C._dynamo.eval_frame._debug_get_cache_entry_list(code)[0].guard_manager.root
    leaves, stack = 0, [root]
    while stack:
        manager = stack.pop()
        leaves += len(manager.get_leaf_guards())
        stack += manager.get_child_managers()
        if hasattr(manager, "get_key_value_managers"):  # a dict's key and value managers
            stack += [m for kv in manager.get_key_value_managers().values() for m in kv if m is not None]
    aliasing = sum(len(g.verbose_code_parts()) for g in root.get_epilogue_lambda_guards())
    return leaves, aliasing


def host_time(model: torch.nn.Module, options: dict | None, repeat: int) -> tuple[float, int]:
    """(seconds per compiled call, number of graph inputs), best of 5 rounds of ``repeat`` calls."""
    from torch._dynamo.backends.common import aot_autograd

    inputs: list[int] = []

    def no_op_compiler(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        inputs.append(len(example_inputs))
        outs = gm(*example_inputs)

        def run(args: list) -> object:
            args.clear()
            return outs

        run._boxed_call = True  # type: ignore[attr-defined]
        return run

    torch._dynamo.reset()
    fn = torch.compile(
        model.forward, backend=aot_autograd(fw_compiler=no_op_compiler), fullgraph=True, options=options
    )
    ids = torch.tensor([[1]])
    best = float("inf")
    with torch.no_grad():
        fn(input_ids=ids, use_cache=False)
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(repeat):
                fn(input_ids=ids, use_cache=False)
            best = min(best, (time.perf_counter() - t) / repeat)
    return best, inputs[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qm_compile_host"))
    ap.add_argument("--fused-groups", action="store_true", help="q/k/v in one launch on the CPU too")
    args = ap.parse_args()
    if os.environ.get("TORCHDYNAMO_DISABLE", "") == "1":  # torch.compile would return the eager forward
        sys.exit(
            "probe_compile_host.py needs torch.compile, but TORCHDYNAMO_DISABLE=1 turns it off: unset it"
        )
    if args.fused_groups:
        from converter.loader import siblings

        siblings.FUSED_DEVICE_TYPES.add("cpu")
    import transformers

    from converter import load_quantized
    from converter.loader import compile_options

    bf16, quantized = build(args.workdir / f"qwen3moe-{args.layers}l", args.layers)
    ours = load_quantized(str(quantized), device="cpu")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16)
    print(
        f"| {args.layers} tiny Qwen3-MoE layers, one compiled call, no-op graph | host µs | graph inputs "
        "| leaf guards | aliasing checks |"
    )
    print("|---|---|---|---|---|")
    for name, model, options in (
        ("ours, torch.compile", ours, None),
        ("ours, options=compile_options()", ours, compile_options()),
        ("bf16 (transformers), torch.compile", theirs, None),
    ):
        t, n = host_time(model, options, args.repeat)
        leaves, aliasing = guard_counts(model)
        print(f"| {name} | {t * 1e6:.0f} | {n} | {leaves} | {aliasing} |", flush=True)


if __name__ == "__main__":
    main()
