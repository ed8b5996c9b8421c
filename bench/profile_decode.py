"""Where one eager decode step's time goes: per top-level module (host + device) and torch.profiler's top ops.

Uses bench_generate's random 8B-shaped Llama (``--layers`` to shrink it) and its NF4 folder, loads one
contender, prefills a prompt, then times single-token forwards with a DynamicCache:

- the whole step (wall, synchronised), and per top-level module (embed_tokens, the decoder layers as
  a group, norm, lm_head, the rest) by forward hooks that synchronise before and after;
- the devices every parameter and buffer sits on (a stray CPU tensor shows up here);
- ``torch.profiler`` on a few steps: the ops with the most self CPU time and the most device time.

    cd /tmp && python /path/to/bench/profile_decode.py --device cuda --layers 8 --contender ours
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import load, nf4_folder, random_llama, sync
from need_cuda import require_cuda


def module_times(model, step, device: str, steps: int) -> dict[str, float]:
    """Mean synchronised wall ms per top-level part of the model over ``steps`` decode steps."""
    inner = model.model
    parts = {"embed_tokens": inner.embed_tokens, "norm": inner.norm, "lm_head": model.lm_head}
    parts["layers"] = inner.layers
    totals: dict[str, float] = collections.defaultdict(float)
    starts: dict[str, float] = {}
    handles = []
    for name, mod in parts.items():
        targets = list(mod) if name == "layers" else [mod]
        first, last = targets[0], targets[-1]

        def pre(_m, _a, name=name):
            sync(device)
            starts[name] = time.perf_counter()

        def post(_m, _a, _o, name=name):
            sync(device)
            totals[name] += time.perf_counter() - starts[name]

        handles.append(first.register_forward_pre_hook(pre))
        handles.append(last.register_forward_hook(post))
    t_all = 0.0
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        t_all += time.perf_counter() - t0
    for h in handles:
        h.remove()
    out = {k: round(v / steps * 1e3, 3) for k, v in totals.items()}
    out["step_total"] = round(t_all / steps * 1e3, 3)
    out["rest"] = round(out["step_total"] - sum(v for k, v in out.items() if k != "step_total"), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--contender", default="ours", choices=["ours", "bnb", "bf16"])
    ap.add_argument("--workdir", default="/tmp/qm_gen")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument(
        "--mode",
        default="generate",
        choices=["generate", "step"],
        help="generate: time/profile warm model.generate() calls; step: hand-made forward steps",
    )
    ap.add_argument("--new", type=int, default=16, help="--mode generate: new tokens per call")
    args = ap.parse_args()
    if args.device == "cuda":
        require_cuda(__file__)

    from transformers import DynamicCache

    work = Path(args.workdir) / f"l{args.layers}"
    plain = random_llama(work / "bf16", args.device, args.layers)
    nf4 = nf4_folder(plain, work / "nf4", args.device)
    model = load(args.contender, plain, nf4, args.device)

    devices = collections.Counter(str(t.device) for t in list(model.parameters()) + list(model.buffers()))
    print("tensor devices:", dict(devices))
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if str(t.device) == "cpu" and args.device == "cuda":
            print("  on cpu:", name, tuple(t.shape), t.dtype)
    print("lm_head:", type(model.lm_head).__name__, "embed:", type(model.model.embed_tokens).__name__)

    print("attn_implementation:", model.config._attn_implementation)
    ids = torch.randint(0, 1000, (1, args.prompt), device=args.device)
    if args.mode == "generate":

        def step():
            with torch.no_grad():
                kw = {"max_new_tokens": args.new, "min_new_tokens": args.new, "pad_token_id": 0}
                kw["do_sample"] = False
                model.generate(ids, attention_mask=torch.ones_like(ids), disable_compile=True, **kw)

        per = args.new  # forwards per step(): the prompt's and new - 1 decode steps
    else:
        cache = DynamicCache()
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True)
        tok = ids[:, -1:]
        pos = [args.prompt]

        def step():
            with torch.no_grad():
                p = torch.tensor([pos[0]], device=args.device)
                model(tok, past_key_values=cache, use_cache=True, cache_position=p)
            pos[0] += 1

        per = 1
    for _ in range(2):
        step()
    times = module_times(model, step, args.device, args.steps)
    print(args.contender, args.mode, f"ms per forward (per {per} forwards/step):",
          {k: round(v / per, 3) for k, v in times.items()})  # fmt: skip

    acts = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(2):
            step()
        sync(args.device)
    table = prof.key_averages().table
    print(table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    if args.device == "cuda":
        print(table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
