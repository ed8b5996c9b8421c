"""CPU fused 4-bit GEMV with bfloat16 x: our exact AVX-512 path vs the AVX512-BF16 (vdpbf16ps) path
vs bitsandbytes' Linear4bit (eval mode) vs bf16 ``F.linear`` on the dense weight.

    python bench/bench_cpu_gemv_bf16dot.py [--rounds 7] [--shapes 4096x4096,1536x576] [--batches 1,4]
                                           [--smollm2-layer] [--isas avx2,avx512bf16]

One thread everywhere (``threads=1``, ``torch.set_num_threads(1)``, OMP_NUM_THREADS=1), timed in the
process's CPU time (``time.process_time``: robust to other jobs on a shared machine, and it counts any
helper thread a library starts). NF4, blocksize 64, nested absmax; the
same quantized weight for ours and bitsandbytes (``Params4bit.from_prequantized``). Rounds are
interleaved (each round times every contender once, a batch of calls each); the table shows the best
round per contender, in microseconds per call. --smollm2-layer adds the sum over the seven projections
of a SmolLM2-135M layer (each timed on its own). Ours is the raw kernel call (``kernels.gemv_4bit``);
bitsandbytes' and F.linear's times include their module / op dispatch. On a CPU without AVX-512
ours runs its best path there (``ours avx2``), so ours still stands beside the baselines; the
bf16dot column then reads n/a.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ["OMP_NUM_THREADS"] = "1"  # before torch and bitsandbytes start their OpenMP runtimes

import torch
import torch.nn.functional as F

from converter.kernels import bnb4bit as kernels
from converter.loader.module import Linear4bit
from formats.quant_types import QuantType
from formats.record import QuantizedTensor

SHAPES = "4096x4096,14336x4096,4096x14336,1536x576,576x576"  # out_features x in_features
#: The seven 4-bit projections of one SmolLM2-135M decoder layer (hidden 576, 9 heads, 3 KV heads of 64,
#: intermediate 1536): q, k, v, o, gate, up, down.
SMOLLM2_LAYER = ("576x576", "192x576", "192x576", "576x576", "1536x576", "1536x576", "576x1536")


def ours_isas(available: list[str], wanted: str | None = None) -> list[str]:
    """Our kernel paths to time: ``--isas`` (those of them this CPU runs), else the AVX-512 ones this CPU
    runs, else its best path (named ``ours <isa>``: without AVX-512 ours would otherwise be missing from
    the table)."""
    if wanted:
        return [isa for isa in wanted.split(",") if isa in available]
    isas = [isa for isa in ("avx512", "avx512bf16") if isa in available]
    return isas or [f"ours {available[-1]}"]


def nf4_weight(out_f: int, in_f: int) -> tuple[torch.Tensor, Linear4bit, dict]:
    """A random bf16 weight [out_f, in_f], our layer of its NF4 quantization (blocksize 64, nested
    absmax) and the keyword arguments of ``kernels.gemv_4bit`` for it (all but x, isa and threads)."""
    w = (torch.randn(out_f, in_f) * 0.02).to(torch.bfloat16)
    packed, absmax = kernels.quantize_4bit(w, blocksize=64, quant_type=QuantType.NF4)
    nested = kernels.quantize_nested(absmax)
    record = QuantizedTensor.from_kernel_outputs(
        "w", (out_f, in_f), "bfloat16", QuantType.NF4, 64, packed, absmax, nested=nested
    )
    layer = Linear4bit.from_record(record).eval()
    state = layer.weight.quant_state
    args = dict(
        packed=packed,
        absmax=None,
        out_features=out_f,
        in_features=in_f,
        blocksize=64,
        quant_map=state.code,
        nested=kernels.NestedAbsmax(*nested, state.state2.code),
    )
    return w, layer, args


def contenders(out_f: int, in_f: int, batch: int, isas: str | None = None) -> dict[str, object]:
    """name -> zero-argument callable for one shape and batch."""
    import bitsandbytes as bnb

    w, ours, args = nf4_weight(out_f, in_f)
    theirs = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    stats = {k: v for k, v in ours.state_dict().items() if k != "weight"}
    theirs.weight = bnb.nn.Params4bit.from_prequantized(ours.weight.data, stats, device="cpu", module=theirs)
    theirs.eval()
    x = torch.randn(batch, in_f).to(torch.bfloat16)

    def gemv(isa: str):
        return lambda: kernels.gemv_4bit(x, **args, isa=isa.removeprefix("ours "), threads=1)

    fns = {isa: gemv(isa) for isa in ours_isas(kernels.cpu_isas(), isas)}
    fns["bnb Linear4bit"] = lambda: theirs(x)
    fns["bf16 F.linear"] = lambda: F.linear(x, w)
    return fns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--shapes", default=SHAPES)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--seconds", type=float, default=0.05, help="CPU time per contender per round")
    parser.add_argument(
        "--smollm2-layer", action="store_true", help="also one SmolLM2-135M layer's projections"
    )
    parser.add_argument(
        "--isas", default=None, help="our paths to time, e.g. avx2,avx512bf16 (default: the AVX-512 ones)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    import bitsandbytes as bnb

    print(f"1 thread, process CPU time, best of {args.rounds} interleaved rounds; isas {kernels.cpu_isas()}")
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}")
    names = None
    batches = [int(b) for b in args.batches.split(",")]

    def best_times(shape: str, batch: int) -> dict[str, float]:
        out_f, in_f = (int(v) for v in shape.split("x"))
        fns = contenders(out_f, in_f, batch, args.isas)
        best = dict.fromkeys(fns, float("inf"))
        with torch.no_grad():
            calls = {}
            for name, fn in fns.items():  # warm up, and size a round to about --seconds
                fn()
                start = time.process_time()
                fn()
                calls[name] = max(1, int(args.seconds / max(time.process_time() - start, 1e-6)))
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    start = time.process_time()
                    for _ in range(calls[name]):
                        fn()
                    best[name] = min(best[name], (time.process_time() - start) / calls[name])
        return best

    def row(label: str, batch: int, best: dict[str, float]) -> None:
        nonlocal names
        if names is None:
            names = list(best)
            print(f"{'out x in':>14} {'B':>2} " + " ".join(f"{n:>15}" for n in names) + "  bf16dot vs avx512")
        cells = " ".join(f"{best[n] * 1e6:13.0f}us" for n in names)
        ratio = f"{best['avx512'] / best['avx512bf16']:.2f}x" if "avx512bf16" in best else "n/a"
        print(f"{label:>14} {batch:>2} {cells}  {ratio}", flush=True)

    for shape in args.shapes.split(","):
        for batch in batches:
            row(shape, batch, best_times(shape, batch))
    if args.smollm2_layer:
        for batch in batches:
            per_shape = {shape: best_times(shape, batch) for shape in set(SMOLLM2_LAYER)}
            total = {
                n: sum(per_shape[shape][n] for shape in SMOLLM2_LAYER) for n in per_shape[SMOLLM2_LAYER[0]]
            }
            row("SmolLM2 layer", batch, total)


if __name__ == "__main__":
    main()
