"""The CUDA side of the fast load: the warm-up thread (converter.loader.warmup) and the reserved
allocator segment (converter.loader.stream.reserve_device_memory). Needs an NVIDIA GPU.

tests/loader/test_loader_stream_cuda.py checks the streamed model itself (same bytes, same logits,
no extra GPU memory held after the load, verify naming a changed chunk) with the warm-up on, as every
CUDA load runs it unless ``QM_LOAD_WARMUP=0``. The primed CUDA context (converter.loader.cuda_context)
needs a process without a CUDA context yet: a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

from converter import load_quantized
from converter.loader import stream, timing, warmup
from converter.loader.state import shard_files
from formats.reader import open_checkpoint

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

IDS = torch.tensor([[1, 5, 9, 2, 7, 3]])


def test_the_warmup_runs_on_cuda_without_error(our_folder: Path) -> None:
    state = open_checkpoint(shard_files(our_folder)[0]).records()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    warm = warmup.Warmup(torch.device("cuda"), our_folder, torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:  # its threads' warnings too (global filters)
        warnings.simplefilter("always")
        warm.start(state)
        warm.join()
    assert warm.error is None
    assert [str(w.message) for w in caught] == [], "nothing said to the user (cuBLAS: no current context)"
    torch.cuda.synchronize()
    # Nothing of the warm-up is kept but the cuBLAS workspace of its thread's handle (torch keeps one
    # per handle and stream, for the next thread that takes the handle): freed here to compare.
    torch._C._cuda_clearCublasWorkspaces()
    assert torch.cuda.memory_allocated() <= before
    assert torch.get_default_dtype() == torch.float32, "no process-wide default changed"


def test_a_timed_cuda_load_warms_joins_and_gives_the_same_logits(
    our_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv(timing.ENV, "1")
    monkeypatch.setenv(warmup.ENV, "1")
    warm = load_quantized(our_folder, device="cuda")
    phases = timing.parse(capsys.readouterr().err)
    assert phases is not None
    assert {
        "warm_context",
        "warm_ops",
        "warm_side_blas",  # cuBLAS and SDPA start on threads of their own beside warm_ops
        "warm_side_head",
        "warm_side_sdpa",
        "warm_layers",
        "warm_done_at",
        "copies_done_at",
        "reserve",
    } <= phases.keys()
    assert "warm_failed" not in phases
    assert phases["warm_done_at"] <= phases["total"], "joined before the load returned"
    assert not any(t.name.startswith("qm-cuda-") for t in threading.enumerate()), "all joined"
    monkeypatch.delenv(timing.ENV)
    monkeypatch.setenv(warmup.ENV, "0")
    cold = load_quantized(our_folder, device="cuda")
    with torch.no_grad():
        ids = IDS.cuda()
        assert torch.equal(warm(ids).logits, cold(ids).logits)


def test_reserved_segment_serves_the_large_tensors() -> None:
    sizes = [3 << 20, (5 << 20) + 7, 64 << 20, 1 << 10]  # the last one is small-pool: not counted
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    mallocs = torch.cuda.memory_stats().get("segment.large_pool.allocated", 0)
    assert stream.reserve_device_memory(torch.device("cuda"), sizes)
    assert torch.cuda.memory_allocated() == allocated, "the reservation holds no tensor"
    tensors = [torch.empty(n, dtype=torch.uint8, device="cuda") for n in sizes]
    # At most the reservation's own cudaMalloc (none when a free cached block was already big enough).
    assert torch.cuda.memory_stats()["segment.large_pool.allocated"] - mallocs <= 1
    del tensors
    assert not stream.reserve_device_memory(torch.device("cuda"), [1 << 10])  # nothing large


_FRESH_LOAD = """
import hashlib, json, sys, torch
from converter import load_quantized
model = load_quantized(sys.argv[1], device="cuda")
with torch.no_grad():
    logits = model(torch.tensor([[1, 5, 9, 2, 7, 3]], device="cuda")).logits
digest = hashlib.sha256()
for name, t in sorted(model.state_dict().items()):
    digest.update(name.encode() + t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
print(json.dumps({"finite": bool(torch.isfinite(logits).all()), "bytes": digest.hexdigest()}))
"""


def _state_digest(model: torch.nn.Module) -> str:
    """sha256 over every state_dict tensor's name and bytes, in name order (as _FRESH_LOAD computes it)."""
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        raw = t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        digest.update(name.encode() + raw)
    return digest.hexdigest()


def test_a_fresh_process_primes_the_context_and_loads_the_same_model(our_folder: Path) -> None:
    # A fresh process: no CUDA context yet (importing converter may initialize torch's CUDA, which makes
    # none), so the load retains the primary context on a side thread (ctypes, the GIL released) and
    # torch's first allocation takes it over; the model must hold the same bytes and run.
    env = {**os.environ, timing.ENV: "1"}
    cmd = [sys.executable, "-c", _FRESH_LOAD, str(our_folder)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    phases = timing.parse(out.stderr)
    assert phases is not None
    assert "context_prime" in phases
    assert "warm_failed" not in phases
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["finite"]
    assert got["bytes"] == _state_digest(load_quantized(our_folder, device="cuda"))
