"""Whole-model MoE decode: Qwen3-30B-A3B shapes, ``load_quantized`` (4-bit) vs the bf16 model in transformers.

Run through ``bench_moe.py --device cuda`` (``--whole`` for a CPU smoke run). No bf16 checkpoint is
written (48 layers are 61 GB):

- ours: a ``--moe-experts quantize`` folder converted from :class:`random_source.RandomSource` (random
  bf16 tensors drawn on the fly, on the GPU when there is one, seeded per tensor name), then
  ``load_quantized(folder, device=...)``;
- bf16: ``Qwen3MoeForCausalLM`` built from the same config directly on the device in bf16 (transformers'
  random init, its default experts implementation).

The two models' weights are different random numbers; a decode's speed does not depend on the values
(same shapes, same routing work: top-k of every token runs the same kernels whatever experts it picks).

Measured: GPU memory of each model after load (whole model and the experts), the MoE blocks' time for
one token (eager and, on CUDA, replayed from a CUDA graph), and greedy ``generate()`` at batch 1 of
``--new`` tokens after a ``--prompt``-token prompt in two modes, the contenders interleaved, best of
``--repeat``: ``eager`` (dynamic cache) and ``compiled`` (one StaticCache per contender passed to every
call, the decode step through ``torch.compile`` mode ``reduce-overhead`` on CUDA; fullgraph first, and
when a contender cannot compile with fullgraph its fallback ``fullgraph=False`` is used and reported).
Optional modes (``--modes``): ``graphed`` and ``graphed-compiled`` (``generate(custom_generate=
converter.loader.decode.graphed_greedy)``, several decode steps per CUDA-graph replay, as
``bench_generate.py`` runs them). ``decode_tok_s`` = (new - 1) / (t(new tokens) - t(1 token)), as
``bench_generate.py`` reports it.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from bench_generate import compile_decode, static_cache, time_generate
from random_source import RandomSource


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _allocated(device: str) -> int:
    return torch.cuda.memory_allocated() if device == "cuda" else 0


def quantized_folder(folder: Path, config: dict, shapes: dict, device: str) -> tuple[Path, float]:
    """The ``--moe-experts quantize`` folder of the random checkpoint (converted once; seconds taken)."""
    if (folder / "config.json").exists():
        return folder, 0.0
    from converter.writer.pipeline import convert

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = RandomSource(config, shapes, device=device)
        convert(src, folder, moe_experts="quantize", device=device, progress=False, overwrite=True)
    return folder, time.perf_counter() - t0


def bf16_model(config: dict, device: str) -> torch.nn.Module:
    """The bf16 model from the config, built on ``device`` with transformers' random init."""
    import transformers

    kwargs = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    cfg = transformers.Qwen3MoeConfig(**kwargs)
    with torch.device(device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


def _experts_bytes(model: torch.nn.Module) -> int:
    """Bytes of the routed experts on the device: our codes + float32 absmax, or bf16's fused params."""
    total = 0
    for layer in model.model.layers:
        experts = layer.mlp.experts
        total += sum(t.nbytes for t in experts.buffers()) + sum(p.nbytes for p in experts.parameters())
    return total


def _run_mode(models: dict, mode: str, ids: torch.Tensor, new: int, repeat: int, device: str) -> dict:
    """generate() rows of every contender in one mode, timed interleaved (best of ``repeat``)."""
    caches, rows = {}, {}
    for name, model in models.items():
        row: dict = {"contender": name, "mode": mode}
        rows[name] = row
        t0 = time.perf_counter()
        try:
            if mode != "eager":
                caches[name] = static_cache(model, ids.shape[1] + new)
            if mode == "compiled":
                _warm_compiled(model, ids, new, caches[name], device, row)
            else:  # warm-up with the timed length (allocator, cuDNN SDPA's per-length plans, graphs)
                for _ in range(1 if mode == "eager" else 2):
                    time_generate(model, ids, new, caches.get(name), device, mode)
            time_generate(model, ids, 1, caches.get(name), device, mode)
        except Exception as exc:  # reported; the other contender still runs
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            log(json.dumps(row))
        row["warmup_s"] = round(time.perf_counter() - t0, 1)
    live = [n for n in models if "error" not in rows[n]]
    best: dict = {n: [float("inf"), float("inf")] for n in live}
    for _ in range(repeat):  # interleaved: every contender once per round
        for name in [n for n in live if "error" not in rows[n]]:
            b = best[name]
            try:
                b[0] = min(b[0], time_generate(models[name], ids, 1, caches.get(name), device, mode))
                b[1] = min(b[1], time_generate(models[name], ids, new, caches.get(name), device, mode))
            except Exception as exc:  # e.g. out of memory: reported, the other contender goes on
                rows[name]["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    for name in [n for n in live if "error" not in rows[n]]:
        t1, tn = best[name]
        rows[name].update(
            ttft_s=round(t1, 4), total_s=round(tn, 3), decode_tok_s=round((new - 1) / (tn - t1), 2),
            generate_tok_s=round(new / tn, 2),
        )  # fmt: skip
        log(json.dumps(rows[name]))
    if os.environ.get("MOE_HOST_PROFILE"):
        for name in [n for n in live if "error" not in rows[n]]:
            rows[name]["host_profile"] = host_profile(models[name], ids, new, caches.get(name), device, mode)
            log(f"{name}, {mode}: " + json.dumps(rows[name]["host_profile"]))
    return rows


def host_profile(model: torch.nn.Module, ids: torch.Tensor, new: int, cache, device: str, mode: str) -> dict:
    """Where one decode token's wall time goes in ``mode``: device busy time (every kernel torch.profiler
    sees, CUDA graph replays included) against wall time, and the host functions that take the most
    time (cProfile, own time), per token of a ``new``-token generate() minus a 1-token one."""
    import cProfile
    import pstats

    walls, busy = [], []
    for n in (1, new):
        activity = torch.profiler.ProfilerActivity
        with torch.profiler.profile(activities=[activity.CUDA if device == "cuda" else activity.CPU]) as prof:
            walls.append(time_generate(model, ids, n, cache, device, mode))
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy.append(sum(e.device_time for e in kernels if e.device_time > 0) / 1e6)
    profiler = cProfile.Profile()
    profiler.enable()
    time_generate(model, ids, new, cache, device, mode)
    profiler.disable()
    stats = pstats.Stats(profiler)
    top = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:25]  # (file, line, fn) -> tt
    per = new - 1
    return {
        "wall_ms_per_token": round(1e3 * (walls[1] - walls[0]) / per, 3),
        "device_busy_ms_per_token": round(1e3 * (busy[1] - busy[0]) / per, 3),
        "host_top_own_ms_per_token": {
            f"{Path(f).name}:{line} {fn}": round(1e3 * v[2] / new, 3) for (f, line, fn), v in top
        },
    }


def _warm_compiled(
    model: torch.nn.Module, ids: torch.Tensor, new: int, cache, device: str, row: dict
) -> None:
    """Compile the decode step (fullgraph=True; where that fails, fullgraph=False, reported with its
    graph breaks) and warm it up twice with the timed length (compilation, then CUDA-graph capture)."""
    import torch._dynamo

    graphs = torch._dynamo.utils.counters["stats"]
    before_graphs = graphs["unique_graphs"]
    skips = _CudagraphSkips()  # reduce-overhead runs a graph without CUDA graphs when inductor skips them
    compile_decode(model, device, fullgraph=True)
    try:
        time_generate(model, ids, new, cache, device)
        row["compile"] = "fullgraph=True"
    except Exception as exc:
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        row["compile"] = f"fullgraph=True failed ({why}); fallback fullgraph=False"
        del model.forward  # compile_decode's wrapper (an instance attribute): back to the class's forward
        counters = torch._dynamo.utils.counters["graph_break"]
        before = sum(counters.values())
        compile_decode(model, device, fullgraph=False)
        time_generate(model, ids, new, cache, device)
        row["graph_breaks"] = sum(counters.values()) - before
    if graphs["unique_graphs"] == before_graphs:
        msg = "torch.compile compiled nothing (TORCHDYNAMO_DISABLE=1?)"
        raise RuntimeError(msg)
    time_generate(model, ids, new, cache, device)
    row["cudagraph_skips"] = skips.finish()


class _CudagraphSkips(logging.Handler):
    """The reasons inductor gave for running a compiled graph without CUDA graphs (its "skipping
    cudagraphs due to ..." warnings) while this handler is attached."""

    def __init__(self) -> None:
        super().__init__()
        from torch._inductor import cudagraph_utils

        self.logger = cudagraph_utils.cudagraphs_log
        self.messages: list[str] = []
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage()[:300])

    def finish(self) -> list[str]:
        self.logger.removeHandler(self)
        return list(dict.fromkeys(self.messages))


def _time_blocks(blocks: list[torch.nn.Module], x: torch.Tensor, iters: int, graph: bool) -> float:
    """Seconds per pass of one token through the MoE blocks (x = x + block(x) per layer)."""

    def step(h: torch.Tensor) -> torch.Tensor:
        for b in blocks:
            h = h + b(h)
        return h

    with torch.no_grad():
        static = x.clone()
        run = lambda: step(static)  # noqa: E731
        if graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    step(static)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step(static)
            run = g.replay
        for _ in range(3):
            run()
        _sync(x.device.type)
        t0 = time.perf_counter()
        for _ in range(iters):
            run()
        _sync(x.device.type)
        return (time.perf_counter() - t0) / iters


def whole_model_bench(
    work: Path, config: dict, shapes: dict, *, device: str, prompt: int, new: int, repeat: int,
    modes: list[str], json_path: str | None,
) -> dict:  # fmt: skip
    from converter.loader.model import load_quantized

    layers, vocab = config["num_hidden_layers"], config["vocab_size"]
    t_all = time.perf_counter()
    q, t_conv = quantized_folder(work / f"qwen3-30b-a3b-{layers}l-v{vocab}-random-q", config, shapes, device)
    log(f"quantized folder {q} ({f'converted in {t_conv:.1f} s' if t_conv else 'reused'})")
    result: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()}",
        "torch": torch.__version__, "layers": layers, "vocab": vocab, "prompt": prompt, "new": new,
        "repeat": repeat, "convert_s": round(t_conv, 1), "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    models, mem, load_s = {}, {}, {}
    for name, make in (
        ("ours", lambda: load_quantized(q, device=device)),
        ("bf16", lambda: bf16_model(config, device)),
    ):
        gc.collect()
        _sync(device)
        before, t0 = _allocated(device), time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models[name] = make().eval()
        _sync(device)
        load_s[name] = round(time.perf_counter() - t0, 1)
        mem[name] = _allocated(device) - before
    experts = {name: _experts_bytes(m) for name, m in models.items()}
    result["load_s"] = load_s
    result["memory_bytes"] = {"model": mem, "experts": experts}
    result["bf16_experts_implementation"] = getattr(models["bf16"].config, "_experts_implementation", None)
    log(json.dumps({"load_s": load_s, "memory_bytes": result["memory_bytes"]}))
    save = functools.partial(_save, result, json_path)  # after every stage: a run cut short keeps its part
    save()

    blocks = {}
    x = torch.randn(1, 1, config["hidden_size"], dtype=torch.bfloat16, device=device)
    for graph in (False, True) if device == "cuda" else (False,):
        best: dict = {}
        for _ in range(repeat):
            for name, m in models.items():
                try:
                    t = _time_blocks([layer.mlp for layer in m.model.layers], x, 20, graph)
                except RuntimeError as exc:  # e.g. an implementation that cannot be captured
                    log(f"{name}, MoE blocks, graph={graph}: {type(exc).__name__}: {str(exc)[:200]}")
                    t = float("nan")
                best[name] = min(best.get(name, float("inf")), t)
        blocks["cuda_graph" if graph else "eager"] = {n: round(t * 1e6, 1) for n, t in best.items()}
    result["moe_blocks_us_per_token"] = blocks
    save()

    torch.manual_seed(0)
    ids = torch.randint(100, min(vocab, 10000), (1, prompt), device=device)
    result["generate"] = []
    if "profile" in modes:  # kernel time per token of the graphed, compiled decode (profile_graphed.py)
        from profile_graphed import profile_model

        for name, m in models.items():
            profile_model(m, f"{name}, {layers} MoE layers", ids[:, :16], 32, compile_step=True)
        modes = [m for m in modes if m != "profile"]
    for mode in modes:
        rows = _run_mode(models, mode, ids, new, repeat, device)
        result["generate"].extend(rows.values())
        save()
    result["total_s"] = round(time.perf_counter() - t_all, 1)
    save()
    print(markdown(result))
    return result


def _save(result: dict, json_path: str | None) -> None:
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def markdown(r: dict) -> str:
    """The result as a markdown table (ours, bf16, the ratio that the target is stated in)."""
    mem, ex = r["memory_bytes"]["model"], r["memory_bytes"]["experts"]
    lines = [
        f"\n## whole model: Qwen3-30B-A3B shapes, {r['layers']} layers, vocab {r['vocab']}, {r['device']}, "
        f"torch {r['torch']}, {r['date']}; prompt {r['prompt']}, {r['new']} new tokens, "
        f"best of {r['repeat']}",
        "| | ours | bf16 | ours vs bf16 |",
        "|---|---|---|---|",
    ]
    if mem["bf16"]:
        lines.append(f"| memory after load (GB) | {mem['ours'] / 1e9:.2f} | {mem['bf16'] / 1e9:.2f} | "
                     f"{100 * mem['ours'] / mem['bf16']:.1f}% |")  # fmt: skip
    lines.append(f"| experts (GB) | {ex['ours'] / 1e9:.2f} | {ex['bf16'] / 1e9:.2f} | "
                 f"{100 * ex['ours'] / ex['bf16']:.1f}% |")  # fmt: skip
    for mode, t in r["moe_blocks_us_per_token"].items():
        lines.append(f"| MoE blocks, 1 token, {mode} (µs) | {t['ours']:.0f} | {t['bf16']:.0f} | "
                     f"{_ratio(t['bf16'], t['ours'])} faster |")  # fmt: skip
    by = {(g["mode"], g["contender"]): g for g in r["generate"]}
    for mode in dict.fromkeys(g["mode"] for g in r["generate"]):
        o, b = by.get((mode, "ours"), {}), by.get((mode, "bf16"), {})
        labels = (("decode_tok_s", "decode tok/s"), ("generate_tok_s", "generate tok/s, prefill incl."))
        for key, label in labels:
            ours, theirs = o.get(key, o.get("error", "n/a")), b.get(key, b.get("error", "n/a"))
            lines.append(f"| {mode}: {label} | {ours} | {theirs} | {_ratio(o.get(key), b.get(key))} |")
        for side, row in (("ours", o), ("bf16", b)):
            if "compile" in row:
                skips = "; ".join(row.get("cudagraph_skips", [])) or "none"
                lines.append(f"| {mode}: {side} compile | {row['compile']}, CUDA-graph skips: {skips} | | |")
    impl = r.get("bf16_experts_implementation")
    lines.append(f"\nconvert {r['convert_s']} s, load {r['load_s']}, whole run {r['total_s']} s")
    lines.append(f"bf16 experts implementation: {impl}")
    return "\n".join(lines)
