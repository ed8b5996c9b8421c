"""Greedy ``generate()`` at batch 1: quantize-model's loader vs transformers + bitsandbytes vs bf16.

All contenders side by side in one process, on one NF4 folder (ours and bnb read the same folder):

- ``ours``: ``converter.load_quantized(folder)``;
- ``ours-alone``: the same with every 4-bit layer launching alone (``ungroup_siblings``: no q/k/v, gate/up
  groups), to measure what the grouped launches give;
- ``ours-general``: the same with every eager 4-bit call on the general route (``ops.linear``), as every
  call ran before round 38's prepared launches (loader/cuda_gemv.py): what they give;
- ``ours-nowarm`` (``--load`` only, when named in ``--load-contenders``): ``ours`` with
  ``QM_LOAD_WARMUP=0``, to measure what the load's CUDA warm-up thread gives;
- ``bnb``: ``AutoModelForCausalLM.from_pretrained(folder)`` (transformers' bitsandbytes integration);
- ``bf16``: the plain bf16 checkpoint.

Modes: ``eager`` (dynamic cache, no compile) and ``compiled`` (static cache; the decode step's forward
through ``torch.compile``, ``mode=reduce-overhead`` (CUDA graphs) on CUDA, inductor's default on CPU;
the prefill runs eager, as transformers' own auto-compile does); ``graphed`` (static cache,
``generate(custom_generate=converter.loader.decode.graphed_greedy)``: 16 decode steps per CUDA-graph
replay, generate()'s per-step host work skipped; it works on any transformers model, so every
contender runs it) and ``graphed-compiled`` (the same with the step's forward through inductor first,
``compile_step=True``). Reported per contender and mode:
``ttft_s`` (prefill + first token), ``decode_tok_s`` = (new - 1) / (t(new tokens) - t(1 token)), best
of ``--repeats``.

``--load`` times call -> first token in fresh subprocesses, interleaved, best of ``--load-repeats``: the
whole subprocess (imports included) and from the load call (every module imported before: imports
excluded); ours with verify on and off, transformers + bnb on the same folder, bf16; then the ratios and
verify's cost. ``--load-profile`` adds one cProfile'd load of ours and of bnb (where the time goes);
``--load-breakdown`` adds to each row its best run's first-forward parts and second forward, and to
ours the phases of its load (``QM_LOAD_TIMING=1``, converter/loader/timing.py).
``--modes ''`` skips the generate runs. ``--sample`` samples instead of greedy decoding, in every mode
(``do_sample=True``, temperature 0.7, top-k 50, top-p 0.9: chat settings; ``graphed`` runs them inside
its graphs), each timed call seeded alike.
``--quality`` (real weights only): next-token log-likelihood of a fixed text, teacher-forced one token
at a time (so the fused GEMV runs) and in one forward (dequantize path), against transformers + bnb and bf16.

    cd /tmp && python /path/to/bench/bench_generate.py --device cpu --model smollm2
    cd /tmp && python /path/to/bench/bench_generate.py --device cuda --model random-8b --prompt 512 --new 128
    cd /tmp && python /path/to/bench/bench_generate.py --device cuda --model random-8b --modes '' --load
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch._dynamo
from need_cuda import require_cuda

#: Llama-3.1-8B's shape (random weights: the speed of a decode does not depend on their values).
LLAMA_8B = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}

TEXT = (
    "The quick brown fox jumps over the lazy dog. Language models predict the next word from the words "
    "before it, and quantization stores their weights in fewer bits so that they load faster and fit in "
    "less memory. A good quantized model keeps almost the same predictions as the original one, while "
    "reading a quarter of the bytes for every token it generates."
)


def require_dynamo(what: str) -> None:
    """Exit when ``TORCHDYNAMO_DISABLE=1`` (our test targets set it): torch.compile then returns the
    function unchanged, and every row labelled compiled would time the eager model."""
    if os.environ.get("TORCHDYNAMO_DISABLE", "") == "1":
        sys.exit(f"{what} needs torch.compile, but TORCHDYNAMO_DISABLE=1 turns it off (it would time eager)")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# -- folders ---------------------------------------------------------------------------------------------


def random_llama(folder: Path, device: str, layers: int | None) -> Path:
    """An 8B-shaped Llama with random weights, created on ``device`` directly and saved in bf16."""
    if (folder / "config.json").exists():
        return folder
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(LLAMA_8B)
    if layers:
        cfg["num_hidden_layers"] = layers
    t0 = time.perf_counter()
    with torch.device(device):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="5GB")
    del model
    gc.collect()
    log(f"random model saved in {time.perf_counter() - t0:.1f} s")
    return folder


def _has_chunk_digests(folder: Path) -> bool:
    """Whether a folder's index records chunk digests (formats/chunks.py): verify=True is timed on them."""
    from formats.index import read_index

    try:
        return all(e.chunks is not None for e in read_index(folder).shards.values())
    except Exception:  # no index, an older format: convert again
        return False


def nf4_folder(plain: Path, out: Path, device: str, max_shard_size: str = "5GB") -> Path:
    if (out / "config.json").exists() and _has_chunk_digests(out):
        return out
    from converter.writer.pipeline import convert

    t0 = time.perf_counter()
    convert(
        plain, out, progress=False, compute_dtype="bfloat16", device=device, max_shard_size=max_shard_size,
        overwrite=(out / "config.json").exists(),  # a folder from before chunk digests
    )  # fmt: skip
    log(f"converted in {time.perf_counter() - t0:.1f} s")
    return out


# -- contenders ------------------------------------------------------------------------------------------


def load(kind: str, plain: Path, nf4: Path, device: str, verify: bool = False) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind in ("ours", "ours-alone", "ours-nowarm", "ours-general"):
            from converter import load_quantized
            from converter.loader.siblings import ungroup_siblings

            if kind == "ours-nowarm":  # the load without its CUDA warm-up thread (loader/warmup.py)
                os.environ["QM_LOAD_WARMUP"] = "0"

            model = load_quantized(nf4, device=device, verify=verify)
            if kind == "ours-alone":  # every 4-bit layer launches alone (no q/k/v, gate/up groups)
                ungroup_siblings(model)
            if (
                kind == "ours-general"
            ):  # eager calls without the prepared launches (every call before round 38)
                general_route(model)
            return model
        if kind == "bnb":
            return AutoModelForCausalLM.from_pretrained(nf4, device_map=device).eval()
        return AutoModelForCausalLM.from_pretrained(plain, dtype=torch.bfloat16, device_map=device).eval()


def general_route(model: torch.nn.Module) -> None:
    """Send every eager 4-bit call of ``model`` down the general route (``ops.linear``,
    ``ops.gemv_prepared_multi``): the A/B of the prepared launches (loader/cpu_gemv.py, cuda_gemv.py)."""
    from converter.loader.module import QuantLinear4bit

    for m in model.modules():
        if isinstance(m, QuantLinear4bit):
            m._eager_gemv = None
            if m._siblings is not None:
                m._siblings._eager_group = lambda x: None


def compile_decode(model: torch.nn.Module, device: str, fullgraph: bool) -> None:
    """The decode step (one token) through torch.compile; the prefill stays eager."""
    mode = "reduce-overhead" if device == "cuda" else "default"
    compiled = torch.compile(model.forward, mode=mode, fullgraph=fullgraph)
    eager = model.forward

    def forward(*args, **kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[-1] == 1:
            return compiled(*args, **kwargs)
        return eager(*args, **kwargs)

    model.forward = forward


def static_cache(model, length: int):
    """One static cache for every timed call of a contender (reset before each).

    transformers' ``generate(cache_implementation="static")`` allocates a new cache on every call; its
    key/value tensors then have new data pointers, and the CUDA graphs recorded for the decode step
    are recorded again inside the timed call. Handing ``generate`` one cache made up front (the way
    transformers' docs reuse a static cache across calls) keeps the pointers fixed, so the graphs are
    replayed.
    """
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=length)


def _cache_kwarg(model) -> str:
    """``cache`` in transformers >= 5.2x, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


#: generate() settings every timed call takes on top of greedy's (``--sample``: SAMPLING).
EXTRA_KWARGS: dict = {}
SAMPLING = {"do_sample": True, "temperature": 0.7, "top_k": 50, "top_p": 0.9}


def time_generate(model, ids: torch.Tensor, new: int, cache, device: str, mode: str = "eager") -> float:
    kwargs = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "disable_compile": True}
    kwargs.update(EXTRA_KWARGS)
    torch.manual_seed(0)
    if mode.startswith("graphed"):
        from converter.loader.decode import graphed_greedy

        kwargs.update(custom_generate=graphed_greedy, compile_step=mode == "graphed-compiled")
    if cache is not None:
        cache.reset()
        kwargs[_cache_kwarg(model)] = cache
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, **kwargs)
    sync(device)
    assert out.shape[1] == ids.shape[1] + new
    return time.perf_counter() - t0


def bench_contender(kind, mode, plain, nf4, device, ids, new, repeats) -> dict:
    model = load(kind, plain, nf4, device)
    row: dict = {"contender": kind, "mode": mode}
    try:
        if mode == "compiled":
            compile_decode(model, device, fullgraph=kind.startswith("ours"))
        cache = static_cache(model, ids.shape[1] + new) if mode != "eager" else None
        t0 = time.perf_counter()
        # Warm-up with the very length timed below, for every contender: compilation and CUDA-graph
        # capture (a static cache's length is part of the compiled graph), the allocator, and the
        # attention backend's per-shape plans (cuDNN SDPA on Hopper builds one per key length, ~5-8 ms
        # each: a contender run first in the process would otherwise pay them inside its timed call).
        for _ in range(2 if cache is not None else 1):
            time_generate(model, ids, new, cache, device, mode)
        row["warmup_s"] = round(time.perf_counter() - t0, 1)
        t1 = min(time_generate(model, ids, 1, cache, device, mode) for _ in range(repeats))
        tn = min(time_generate(model, ids, new, cache, device, mode) for _ in range(repeats))
        row.update(ttft_s=round(t1, 4), total_s=round(tn, 3), decode_tok_s=round((new - 1) / (tn - t1), 2))
    except Exception as exc:  # a contender that cannot run this mode is reported, not fatal
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    log(json.dumps(row))
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return row


# -- load time -------------------------------------------------------------------------------------------

_LOAD_SNIPPET = """
import sys, time
t0 = time.perf_counter()
import json, torch
kind, plain, nf4, device, verify, profile = sys.argv[1:7]
sys.path.insert(0, {bench!r})
from bench_generate import load, sync
# Imports excluded: every module either side needs is imported before the clock starts (bitsandbytes,
# which transformers imports on a 4-bit load, the model class, our loader); CUDA init is timed for all.
import bitsandbytes, transformers
import converter.loader.model
folder = nf4 if kind != "bf16" else plain
getattr(transformers, json.load(open(folder + "/config.json"))["architectures"][0])
if profile == "1":
    import cProfile, io, pstats
    prof = cProfile.Profile()
    prof.enable()
t1 = time.perf_counter()
m = load(kind, plain, nf4, device, verify == "1")
sync(device)
t2 = time.perf_counter()
ids = torch.tensor([[1, 2, 3, 4]], device=device)
t_ids = time.perf_counter()
with torch.no_grad():
    m(ids)
    t_host = time.perf_counter()
    sync(device)
    t3 = time.perf_counter()
    m(ids)  # not timed in the totals: the second forward shows what of the first was one-time work
    sync(device)
    t4 = time.perf_counter()
if profile == "1":
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(30)
    print(text.getvalue()[-6000:], file=sys.stderr)
# First forward's parts: the input's copy, the host time to return, the wait for the device after it.
parts = dict(first_ids_s=t_ids - t2, first_fwd_host_s=t_host - t_ids, first_fwd_sync_s=t3 - t_host,
             second_fwd_s=t4 - t3)  # fmt: skip
print(json.dumps(dict(with_imports=t3 - t0, excl=t3 - t1, load=t2 - t1, **parts)))
"""

LOAD_CASES = (("ours", True), ("ours", False), ("ours-nowarm", False), ("bnb", False), ("bf16", False))
#: What ``--load`` times unless ``--load-contenders`` names others (``ours-nowarm`` only when named).
DEFAULT_LOAD_KINDS = ("ours", "bnb", "bf16")


def _read_folder(folder: Path) -> None:
    """Every file read once, so all contenders start from the same (warm) page cache."""
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb", buffering=0) as f:
                while f.read(64 << 20):
                    pass


def bench_load(
    plain: Path,
    nf4: Path,
    device: str,
    repeats: int,
    profile: bool = False,
    contenders: str = "",
    breakdown: bool = False,
) -> list[dict]:
    """call -> first token per contender, best of ``repeats`` fresh subprocesses run interleaved.

    ``with_imports_s``: the subprocess's wall time (interpreter start, imports, CUDA init, load, one
    forward). ``imports_excluded_s``: from the load call to the end of the first forward, with every
    module imported before (``load_s``: the load call alone). ``breakdown``: each row also gets the
    first forward's parts and the second forward's time, and ours the phases of its load
    (``QM_LOAD_TIMING``, converter/loader/timing.py), all of the contender's best run.
    """
    from converter.loader import timing

    snippet = _LOAD_SNIPPET.format(bench=str(Path(__file__).resolve().parent))
    _read_folder(nf4)
    _read_folder(plain)
    wanted = set(contenders.split(",")) if contenders else set(DEFAULT_LOAD_KINDS)
    best: dict = {case: None for case in LOAD_CASES if case[0] in wanted}
    details: dict = {}  # the best run's first-forward parts and load phases, per case
    errors: dict = {}
    env = {**os.environ, timing.ENV: "1"} if breakdown else {**os.environ}
    for _ in range(repeats):
        for kind, verify in best:
            if (kind, verify) in errors:
                continue
            t_start = time.perf_counter()
            cmd = [sys.executable, "-c", snippet, kind, str(plain), str(nf4), device, str(int(verify)), "0"]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            wall = time.perf_counter() - t_start
            if out.returncode:
                errors[(kind, verify)] = out.stderr.strip()[-300:]
                continue
            got = json.loads(out.stdout.strip().splitlines()[-1])
            excl, load_only = got["excl"], got["load"]
            prev = best[(kind, verify)] or (float("inf"),) * 3
            if excl < prev[1]:
                parts = {k: round(v, 4) for k, v in got.items() if k.endswith("_s")}
                phases = timing.parse(out.stderr)
                details[(kind, verify)] = {**parts, **({"phases": phases} if phases else {})}
            best[(kind, verify)] = (min(prev[0], wall), min(prev[1], excl), min(prev[2], load_only))
    rows = []
    for (kind, verify), times in best.items():
        row: dict = {"contender": kind, "verify": verify}
        if (kind, verify) in errors:
            row["error"] = errors[(kind, verify)]
        else:
            row.update(with_imports_s=round(times[0], 2), imports_excluded_s=round(times[1], 2),
                       load_s=round(times[2], 2))  # fmt: skip
            if breakdown:
                row.update(details.get((kind, verify), {}))
        rows.append(row)
        log(json.dumps(row))
    by = {(r["contender"], r["verify"]): r for r in rows if "error" not in r}
    if ("ours", False) in by and ("ours", True) in by:
        off, on = by[("ours", False)], by[("ours", True)]
        summary = {
            "verify_cost_pct": round(100 * (on["imports_excluded_s"] / off["imports_excluded_s"] - 1), 1),
        }
        if ("ours-nowarm", False) in by:  # > 1: the warm-up thread saves more than it costs
            nowarm = by[("ours-nowarm", False)]["imports_excluded_s"]
            summary["nowarm/ours_verify_off_imports_excluded"] = round(nowarm / off["imports_excluded_s"], 2)
        for other in ("bnb", "bf16"):
            if (other, False) in by:
                theirs = by[(other, False)]
                for key in ("imports_excluded_s", "with_imports_s"):
                    summary[f"{other}/ours_verify_off_{key[:-2]}"] = round(theirs[key] / off[key], 2)
                    summary[f"{other}/ours_verify_on_{key[:-2]}"] = round(theirs[key] / on[key], 2)
        rows.append({"summary": summary})
        log(json.dumps(rows[-1]))
    if profile:  # where ours (verify on) and transformers + bnb spend the load, one profiled run each
        for kind, verify in (("ours", True), ("bnb", False)):
            cmd = [sys.executable, "-c", snippet, kind, str(plain), str(nf4), device, str(int(verify)), "1"]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            log(f"--- cProfile of {kind} (verify={verify}), load call -> first forward ---")
            log("\n".join(line for line in out.stderr.splitlines() if "Warning" not in line)[-6000:])
    return rows


# -- quality ---------------------------------------------------------------------------------------------


def nll(model, ids: torch.Tensor, stepwise: bool) -> tuple[float, torch.Tensor]:
    """Mean negative log-likelihood of ids[1:] and the logits that predict them (float32): one forward
    (the dequantize path), or token by token with a cache (the fused GEMV path)."""
    with torch.no_grad():
        if not stepwise:
            logits = model(ids).logits[0, :-1].float()
        else:
            from transformers import DynamicCache

            cache, rows = DynamicCache(), []
            for t in range(ids.shape[1] - 1):
                out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
                rows.append(out.logits[0, -1].float())
            logits = torch.stack(rows)
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item(), logits


def quality_ids(plain: Path, nf4: Path, device: str) -> torch.Tensor:
    """TEXT's token ids: from ``quality_ids.json`` where the folder has one (bench/quality_sample.py:
    a cut-down vocabulary, no tokenizer), else from the model's tokenizer."""
    for folder in (nf4, plain):
        if (folder / "quality_ids.json").is_file():
            ids = json.loads((folder / "quality_ids.json").read_text())["ids"]
            return torch.tensor([ids], device=device)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(plain)(TEXT, return_tensors="pt").input_ids.to(device)


def _compare(logits: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Largest |logit difference| and the share of positions with the same top-1 token."""
    return (
        round((logits - ref).abs().max().item(), 4),
        round((logits.argmax(-1) == ref.argmax(-1)).float().mean().item(), 4),
    )


def bench_quality(plain: Path, nf4: Path, device: str) -> list[dict]:
    """Per contender: perplexity of TEXT from one forward and token by token, and logits against bf16's
    in the same way (one forward: our dequantize path; token by token: our fused GEMV), and the two
    paths of one contender against each other."""
    ids = quality_ids(plain, nf4, device)
    rows = []
    ref: dict[bool, torch.Tensor] = {}
    for kind in ("bf16", "ours", "bnb"):
        model = load(kind, plain, nf4, device)
        row: dict = {"contender": kind, "tokens": int(ids.shape[1])}
        got = {}
        for stepwise, name in ((False, "forward"), (True, "stepwise")):
            loss, got[stepwise] = nll(model, ids, stepwise)
            ref.setdefault(stepwise, got[stepwise])
            row[f"ppl_{name}"] = round(float(torch.exp(torch.tensor(loss))), 3)
            row[f"{name}_max_abs_logit_diff_vs_bf16"], row[f"{name}_top1_agree_vs_bf16"] = _compare(
                got[stepwise], ref[stepwise]
            )
        row["stepwise_vs_forward_max_abs_logit_diff"], row["stepwise_vs_forward_top1_agree"] = _compare(
            got[True], got[False]
        )
        rows.append(row)
        log(json.dumps(row))
        del model
        gc.collect()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="smollm2", help="smollm2, random-8b, or a bf16 checkpoint folder")
    ap.add_argument("--layers", type=int, default=None, help="random-8b: fewer layers (smoke runs)")
    ap.add_argument("--workdir", default="/tmp/qm_bench_generate")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--contenders", default="ours,bnb,bf16")
    ap.add_argument("--modes", default="eager,compiled", help="generate modes; '' for none (load only)")
    ap.add_argument("--load", action="store_true", help="also time call -> first token")
    ap.add_argument(
        "--max-shard-size", default="5GB", help="of our NF4 conversion (verify hashes shards in parallel)"
    )
    ap.add_argument("--load-repeats", type=int, default=3, help="fresh subprocesses per load contender")
    ap.add_argument("--load-profile", action="store_true", help="also cProfile one load of ours and bnb")
    ap.add_argument(
        "--load-breakdown",
        action="store_true",
        help="--load: also the phases of each best run (QM_LOAD_TIMING)",
    )
    ap.add_argument("--load-contenders", default="", help="of ours,bnb,bf16 (default: all) for --load")
    ap.add_argument("--quality", action="store_true", help="also perplexity / logits on real weights")
    ap.add_argument("--nf4", default=None, help="an existing NF4 folder of --model (default: converted)")
    ap.add_argument("--sample", action="store_true", help="sample (temperature 0.7, top-k 50, top-p 0.9)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.device == "cuda":
        require_cuda(__file__)
    compiled = [m for m in args.modes.split(",") if m.endswith("compiled")]
    if compiled:
        require_dynamo(f"bench_generate.py --modes {','.join(compiled)}")
    if args.sample:
        EXTRA_KWARGS.update(SAMPLING)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.model == "smollm2":
        from converter.tools import samples

        plain = samples.smollm2(Path(os.environ.get("QM_SAMPLES_DIR", samples.DEFAULT_SAMPLES_DIR)))
    elif args.model == "random-8b":
        plain = random_llama(work / f"llama8b-{args.layers or 32}", args.device, args.layers)
    else:
        plain = Path(args.model)
    suffix = "" if args.max_shard_size == "5GB" else f"-{args.max_shard_size}"
    if args.nf4:
        nf4 = Path(args.nf4)
    else:
        nf4 = nf4_folder(plain, work / f"{plain.name}-nf4{suffix}", args.device, args.max_shard_size)
    torch.manual_seed(0)
    ids = torch.randint(100, 10000, (1, args.prompt), device=args.device)
    result = {
        "device": (
            torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu x{torch.get_num_threads()}"
        ),
        "torch": torch.__version__,
        "model": args.model,
        "prompt": args.prompt,
        "new": args.new,
        "sampling": dict(EXTRA_KWARGS),
        "generate": [],
    }
    for mode in [m for m in args.modes.split(",") if m]:  # --modes "" with --load: load times only
        for kind in args.contenders.split(","):
            result["generate"].append(
                bench_contender(kind, mode, plain, nf4, args.device, ids, args.new, args.repeats)
            )
    if args.load:
        result["load"] = bench_load(
            plain,
            nf4,
            args.device,
            args.load_repeats,
            args.load_profile,
            args.load_contenders,
            args.load_breakdown,
        )
    if args.quality:
        result["quality"] = bench_quality(plain, nf4, args.device)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
