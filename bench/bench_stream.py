"""The loader's shard stream alone (``converter.loader.stream``): GB/s by reader count and chunk size.

A file of ``--gb`` GB laid out like an 8B Llama's NF4 shard (packed codes of the q/k/v/o and MLP
projections, their absmax, norms) is written once (kept in the page cache), memory-mapped, and its
tensors streamed to ``--device`` by ``stream_state`` for each (readers, chunk MiB) pair, best of
``--repeat``; beside it, in the same run, one thread reading the whole file into one buffer (the
plain read) and, on CUDA, that buffer's pinned copy to the device. Every tensor is compared with its
bytes in the file after each case (the stream must copy exactly). No transformers import: a run
takes seconds.

    cd /tmp && python /path/to/bench/bench_stream.py --device cuda --gb 5.7 --readers 4,8,12 --chunks 8,16,32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from need_cuda import require_cuda

from converter.loader import stream
from formats.chunks import read_exact

HIDDEN, KV, MLP = 4096, 1024, 14336
# One decoder layer's tensors in bytes: NF4 codes (2 per byte) and float32 absmax (one per 64).
SHAPES = ((HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN))  # q, k, v, o
SHAPES += ((MLP, HIDDEN), (MLP, HIDDEN), (HIDDEN, MLP))  # gate, up, down
LAYER = [n for rows, cols in SHAPES for n in (rows * cols // 2, rows * cols // 64 * 4)] + [HIDDEN * 2] * 2


def make_file(path: Path, nbytes: int) -> list[tuple[int, int]]:
    """(offset, size) of every tensor of a file of about ``nbytes`` bytes (written once, reused)."""
    sizes, total = [], 0
    while total < nbytes:
        for n in LAYER:
            sizes.append(n)
            total += n
    if not path.exists() or path.stat().st_size != total:
        block = np.random.default_rng(0).integers(0, 256, 64 << 20, dtype=np.uint8).tobytes()
        with open(path, "wb") as f:
            left = total
            while left:
                left -= f.write(block[: min(left, len(block))])
    spans, off = [], 0
    for n in sizes:
        spans.append((off, n))
        off += n
    return spans


def plain_read(path: Path, device: torch.device) -> dict:
    """One thread reading the file into one pinned (CUDA) buffer, then copying it to the device."""
    size = path.stat().st_size
    buf = torch.empty(size, dtype=torch.uint8, pin_memory=device.type == "cuda")
    buf.fill_(0)  # faulted in first (as pinned memory is): the read alone is timed
    fd = os.open(path, os.O_RDONLY)
    t0 = time.perf_counter()
    try:
        read_exact(fd, memoryview(buf.numpy()), 0)
    finally:
        os.close(fd)
    read_s = time.perf_counter() - t0
    row = {"case": "plain read, 1 thread", "gb_s": round(size / read_s / 1e9, 2), "s": round(read_s, 4)}
    if device.type == "cuda":
        dst = torch.empty(size, dtype=torch.uint8, device=device)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(buf, non_blocking=True)
        torch.cuda.synchronize()
        h2d = time.perf_counter() - t0
        row["h2d_pinned_gb_s"] = round(size / h2d / 1e9, 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--readers", default="1,2,4,8")
    ap.add_argument("--chunks", default="16", help="chunk MiB values")
    ap.add_argument("--slots-per-reader", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--file", default="/tmp/qm_stream_bench.bin")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if torch.device(args.device).type == "cuda":
        require_cuda(__file__)
    device = torch.device(args.device)
    path = Path(args.file)
    spans = make_file(path, int(args.gb * 1e9))
    size = path.stat().st_size
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    with warnings.catch_warnings():  # read-only: nothing writes to it
        warnings.simplefilter("ignore")
        base = torch.from_numpy(mm)  # the tensors are views of the mapping, as load_quantized_state's
    state = {f"t{i}": base[o : o + n] for i, (o, n) in enumerate(spans)}
    files = [stream.MappedFile(path, int(mm.ctypes.data), size)]
    if device.type == "cuda":
        torch.empty(1, device=device)  # the context, outside the timings
    rows = [plain_read(path, device)]
    print(json.dumps(rows[-1]), file=sys.stderr)
    for readers in (int(r) for r in args.readers.split(",")):
        for chunk in (int(c) for c in args.chunks.split(",")):
            best = float("inf")
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                out = stream.stream_state(
                    state,
                    files,
                    device,
                    chunk_bytes=chunk << 20,
                    slots=readers * args.slots_per_reader,
                    readers=readers,
                )
                if device.type == "cuda":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
                bad = [k for k in state if not torch.equal(out[k].cpu(), state[k])]
                assert not bad, f"bytes differ in {bad[:3]}"
                del out
            row = {"case": "stream", "readers": readers, "chunk_mib": chunk, "s": round(best, 4)}
            row["gb_s"] = round(size / best / 1e9, 2)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    result = {"device": str(device), "bytes": size, "tensors": len(spans), "cpus": os.cpu_count()}
    result["rows"] = rows
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
