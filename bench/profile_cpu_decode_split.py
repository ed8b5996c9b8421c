"""Where one CPU decode token goes, by module kind, ours vs the bf16 model (SmolLM2-135M, real weights).

Forward hooks time every module of a kind (the 4-bit or bf16 projections, each layer's attention and
MLP, the norms, the head) over greedy ``generate()`` of ``--new`` tokens after ``--prompt``, minus a
1-token call: milliseconds per decode token, and calls per token. Attention and MLP include their
projections; "rest" is the step minus the layers' attention, MLP and norms and the head (the decoder
loop, rotary embeddings, ``generate()``'s own work). The hooks cost a few µs per call: compare the
kinds, not the totals, with ``bench_cpu_decode_ab.py``. Then each projection shape cache-resident
(the same layer called over and over): ours against ``F.linear`` on the bf16 weight, µs per call.

Run it under the environment being studied (``QM_CPU_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2`` forces the AVX2 paths on an AVX-512 host):

    cd /tmp && python /path/to/bench/profile_cpu_decode_split.py --threads 2
"""

from __future__ import annotations

import argparse
import collections
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import bench_generate as bg
import torch
from torch import nn

from converter.kernels.isa_env import running_isa
from converter.loader.module import QuantLinear4bit
from converter.tools import samples

KINDS = ("projections", "attention", "mlp", "norm", "head")


def _kind(name: str, module: nn.Module) -> str | None:
    if name == "lm_head":
        return "head"
    if isinstance(module, QuantLinear4bit) or (type(module) is nn.Linear and ".layers." in name):
        return "projections"
    leaf = name.rpartition(".")[2]
    return {"self_attn": "attention", "mlp": "mlp"}.get(leaf, "norm" if leaf.endswith("norm") else None)


def split(model: nn.Module, ids: torch.Tensor, new: int) -> dict[str, tuple[float, float]]:
    """{kind: (ms per decode token, calls per decode token)}, best of 3 runs each."""
    spent: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.defaultdict(int)
    started: dict[int, float] = {}
    handles = []
    for name, module in model.named_modules():
        kind = _kind(name, module)
        if kind is None:
            continue

        def pre(mod: nn.Module, args: tuple) -> None:
            started[id(mod)] = time.perf_counter()

        def post(mod: nn.Module, args: tuple, out: object, kind: str = kind) -> None:
            spent[kind] += time.perf_counter() - started[id(mod)]
            calls[kind] += 1

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def run(n: int) -> tuple[float, dict[str, float], dict[str, int]]:
        spent.clear()
        calls.clear()
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - start, dict(spent), dict(calls)

    run(4)  # warm-up
    one = min((run(1) for _ in range(3)), key=lambda r: r[0])
    many = min((run(new + 1) for _ in range(3)), key=lambda r: r[0])
    for h in handles:
        h.remove()
    per = lambda a, b: (a - b) / new * 1e3  # noqa: E731
    out = {
        k: (per(many[1].get(k, 0), one[1].get(k, 0)), (many[2].get(k, 0) - one[2].get(k, 0)) / new)
        for k in KINDS
    }
    # attention and MLP hold the projections: rest = step - (attention + mlp + norm + head)
    total = per(many[0], one[0])
    out["step"] = (total, 1.0)
    out["rest"] = (total - sum(out[k][0] for k in ("attention", "mlp", "norm", "head")), 0.0)
    return out


def _per_call_us(fn: Callable[[], object], n: int = 2000) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--workdir", default="/tmp/qm_bench_generate")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bg.log(f"threads={args.threads} isa={running_isa()} loadavg={os.getloadavg()}")
    plain = samples.smollm2(Path(os.environ.get("QM_SAMPLES_DIR", samples.DEFAULT_SAMPLES_DIR)))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    nf4 = bg.nf4_folder(plain, work / f"{plain.name}-nf4", "cpu")
    ids = torch.randint(100, 10000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    models = {name: bg.load(name, plain, nf4, "cpu") for name in ("ours", "bf16")}
    rows = {name: split(model, ids, args.new) for name, model in models.items()}
    print(f"ms per decode token (calls per token), {args.threads} threads, isa={running_isa()}")
    print(f"{'kind':12} {'ours':>16} {'bf16':>16}")
    for kind in (*KINDS, "rest", "step"):
        cells = [f"{rows[n][kind][0]:7.2f} ({rows[n][kind][1]:4.0f})" for n in ("ours", "bf16")]
        print(f"{kind:12} {cells[0]:>16} {cells[1]:>16}")
    print("\nµs per call, cache-resident (layer 0), 1 token: ours 4-bit layer / bf16 F.linear")
    ours = dict(models["ours"].named_modules())
    bf16 = dict(models["bf16"].named_modules())
    with torch.no_grad():
        for name in ("self_attn.k_proj", "self_attn.q_proj", "mlp.up_proj", "mlp.down_proj"):
            layer, linear = ours[f"model.layers.0.{name}"], bf16[f"model.layers.0.{name}"]
            x = torch.randn(1, 1, linear.in_features).to(torch.bfloat16)
            print(
                f"{name:18} {tuple(linear.weight.shape)!s:12} {_per_call_us(lambda: layer(x)):6.1f} / "  # noqa: B023
                f"{_per_call_us(lambda: linear(x)):6.1f}"  # noqa: B023
            )


if __name__ == "__main__":
    main()
