"""Verification by chunk digests vs by whole-file sha256, on one folder, side by side in one process.

For a converted folder (default: SmolLM2-135M converted to NF4 into ``--workdir``), interleaved, best
of ``--repeats``, page cache warm (every file read once first):

- ``verify_shards``: every shard hashed by its chunk digests on ``--threads`` threads (default: all
  cores) vs by its whole-file sha256 (the index's chunk entries ignored, as for a folder written
  before them: one thread per shard);
- ``load_quantized(folder, verify=...)`` on the CPU (mapped path) and on the streamed path (the path a
  GPU load takes, run here with CPU destinations): verify off, on by chunks, on by whole file.
  One warm-up load first, so imports and first-call costs are excluded.

Run from outside the source tree: ``cd /tmp && python /path/to/bench/bench_verify.py [--folder F]``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def _whole_file_only() -> Iterator[None]:
    """Make every index look as written before chunk digests (chunks=None)."""
    from formats import index as index_mod

    real = index_mod.read_index

    def read_index(folder, **kw):
        idx = real(folder, **kw)
        shards = {n: dataclasses.replace(e, chunks=None) for n, e in idx.shards.items()}
        return dataclasses.replace(idx, shards=shards)

    index_mod.read_index = read_index
    try:
        yield
    finally:
        index_mod.read_index = real


@contextlib.contextmanager
def _streamed(on: bool) -> Iterator[None]:
    from converter.loader import state

    real = state.streams_to
    if on:
        state.streams_to = lambda device: True
    try:
        yield
    finally:
        state.streams_to = real


def best(cases: dict[str, tuple[Callable[[], object], Callable[[], contextlib.AbstractContextManager]]],
         repeats: int) -> dict[str, float]:  # fmt: skip
    """name -> (function, context to run it in): the best time of each, the cases interleaved."""
    times: dict[str, float] = dict.fromkeys(cases, float("inf"))
    for _ in range(repeats):
        for name, (fn, ctx) in cases.items():
            with ctx():
                t = time.perf_counter()
                fn()
                times[name] = min(times[name], time.perf_counter() - t)
    return {k: round(v, 3) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", default=None, help="a converted folder (default: SmolLM2-135M NF4)")
    ap.add_argument("--workdir", default="/tmp/qm_bench_verify")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-load", action="store_true", help="only verify_shards")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    if args.folder:
        folder = Path(args.folder)
    else:
        from converter.tools import samples
        from converter.writer.pipeline import convert

        plain = samples.smollm2(Path(os.environ.get("QM_SAMPLES_DIR", samples.DEFAULT_SAMPLES_DIR)))
        folder = Path(args.workdir) / "smollm2-nf4"
        if not (folder / "config.json").exists():
            convert(plain, folder, progress=False)
    from bench_generate import _read_folder  # every file read once: a warm page cache

    from formats.index import read_index, verify_shards

    index = read_index(folder)
    _read_folder(folder)
    result: dict = {
        "folder": str(folder),
        "cores": len(os.sched_getaffinity(0)),
        "bytes": sum(e.size for e in index.shards.values()),
        "chunks": sum(len(e.chunks.sha256) for e in index.shards.values() if e.chunks),
        "load_avg": os.getloadavg()[0],
    }

    def check() -> None:
        assert verify_shards(folder, threads=args.threads) == []

    result["verify_shards_s"] = best(
        {"chunks": (check, contextlib.nullcontext), "whole_file": (check, _whole_file_only)}, args.repeats
    )
    if not args.no_load:
        from converter import load_quantized

        for path in ("mapped", "streamed"):
            with _streamed(path == "streamed"):
                load_quantized(folder, verify=False)  # warm-up: imports, first-call costs
                off, on = (lambda: load_quantized(folder, verify=False)), (lambda: load_quantized(folder))
                result[f"load_{path}_s"] = best(
                    {
                        "verify_off": (off, contextlib.nullcontext),
                        "verify_chunks": (on, contextlib.nullcontext),
                        "verify_whole_file": (on, _whole_file_only),
                    },
                    args.repeats,
                )
    result["load_avg_after"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
