"""Where a graphed decode token's GPU time goes: the kernels inside the replayed CUDA graphs.

Loads each contender of bench_generate (``--layers`` decoder layers of the 8B shape), runs
``generate(custom_generate=graphed_greedy)`` once to record its graphs, then profiles one call of
``--new`` tokens with torch.profiler (CUPTI sees the kernels a graph replay launches) and prints, per
contender, the device time per token by kernel family and the top kernels.

    cd /tmp && python /path/to/bench/profile_graphed.py --layers 8 --contenders ours,bf16 [--compile-step]
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import load, nf4_folder, random_llama, require_dynamo, static_cache
from need_cuda import require_cuda

FAMILIES = (  # first match wins: (family, substrings of the kernel name)
    ("4-bit GEMV (ours)", ("gemv",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn", "xmma_fprop", "softmax")),
    ("bf16 GEMM/GEMV (cuBLAS, CUTLASS)", ("gemm", "gemv", "cutlass", "sm90", "nvjet", "cublas")),
    ("inductor fused (triton)", ("triton",)),
    ("cache update / copies", ("index", "copy", "scatter", "cat")),
    ("reduce / argmax", ("reduce", "argmax", "max")),
    ("element-wise", ("elementwise", "vectorized", "unrolled")),
)


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "other"


def profile(kind: str, plain: Path, nf4: Path, ids: torch.Tensor, new: int, compile_step: bool) -> None:
    model = load(kind, plain, nf4, "cuda")
    profile_model(model, kind, ids, new, compile_step)
    del model
    torch.cuda.empty_cache()
    torch._dynamo.reset()


def profile_model(
    model: torch.nn.Module, label: str, ids: torch.Tensor, new: int, compile_step: bool
) -> None:
    """Print the kernel time per new token of ``model``'s graphed greedy decode, by family and top kernels."""
    from converter.loader.decode import graphed_greedy

    cache = static_cache(model, ids.shape[1] + new)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, cache=cache)
    kw.update(custom_generate=graphed_greedy, compile_step=compile_step)
    for _ in range(2):  # record the graphs
        cache.reset()
        model.generate(ids, **kw)
    torch.cuda.synchronize()
    cache.reset()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        model.generate(ids, **kw)
        torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0:
            k = per_kernel[ev.name]
            k[0] += ev.device_time
            k[1] += 1
    # the prefill's kernels are in there too: per token = (total - prefill) / decode steps is not
    # separable by name, so the prompt is kept short (--prompt) and the numbers are per new token
    fams: dict[str, float] = collections.defaultdict(float)
    for name, (us, _n) in per_kernel.items():
        fams[family(name)] += us
    total = sum(fams.values())
    print(f"\n## {label}, compile_step={compile_step}: {total / new:.0f} us of kernels per new token")
    print("| family | us per token | share |")
    print("|---|---|---|")
    for fam, us in sorted(fams.items(), key=lambda x: -x[1]):
        print(f"| {fam} | {us / new:.1f} | {us / total:.1%} |")
    print("\n| kernel | calls per token | us per token |")
    print("|---|---|---|")
    for name, (us, n) in sorted(per_kernel.items(), key=lambda x: -x[1][0])[:25]:
        print(f"| {name[:110]} | {n / new:.1f} | {us / new:.1f} |")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--workdir", default="/tmp/qm_gen")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--contenders", default="ours,bf16")
    ap.add_argument("--compile-step", action="store_true")
    args = ap.parse_args()
    if args.compile_step:
        require_dynamo("profile_graphed.py --compile-step")
    require_cuda(__file__)
    work = Path(args.workdir)
    plain = random_llama(work / f"llama8b-{args.layers}", "cuda", args.layers)
    nf4 = nf4_folder(plain, work / f"{plain.name}-nf4", "cuda")
    torch.manual_seed(0)
    ids = torch.randint(100, 10000, (1, args.prompt), device="cuda")
    for kind in args.contenders.split(","):
        profile(kind, plain, nf4, ids, args.new, args.compile_step)


if __name__ == "__main__":
    main()
