"""The preflight's peak-memory bound (``working_set_bound``) with ``--device cuda``, without a GPU.

The 4-bit GPU quantizer (``converter.quantize.cuda_host.CudaHostQuantizer``) holds pinned host staging
for the whole run and keeps ``DEPTH`` tensors submitted; the bound counts both, from the same
functions the quantizer sizes them with (``cuda_host.pinned_bytes``, ``cuda_host.DEPTH``), so the two
cannot drift. The extension is replaced by a fake that records what it is asked to allocate.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch  # noqa: F401  (imported, as in a run that plans with transformers: its import is not counted)

from converter import _kernels
from converter.methods.base import DeviceFootprint
from converter.plan import preflight
from converter.plan.tensor_plan import Options
from converter.quantize import cuda_host
from converter.record.quality import QualityMeter
from converter.writer import pipeline
from formats.chunks import CHUNK_BYTES
from formats.quant_types import QuantType


class RecordingPipe:
    """``_kernels.CudaHostPipeline`` as far as its constructor and submit / wait bookkeeping go: records
    the chunk size it is built with (csrc/cuda/host_pipeline.cpp allocates its pinned staging from it)
    and the most tensors submitted and not yet waited for."""

    built: list[int]

    def __init__(self, device, quant_type, blocksize, nested, chunk_bytes, threads, mids) -> None:
        RecordingPipe.built.append(chunk_bytes)
        self.open: set[int] = set()
        self.most = 0
        self.tickets = itertools.count(1)

    def submit(self, x, dtype, n, packed, absmax, codes, nested_absmax) -> int:
        ticket = next(self.tickets)
        self.open.add(ticket)
        self.most = max(self.most, len(self.open))
        return ticket

    def wait(self, ticket: int) -> tuple:
        self.open.discard(ticket)
        return False, 0.0, 0.0, 0.0, 0.0, 0.0


@pytest.fixture
def recording_pipe(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    RecordingPipe.built = []
    monkeypatch.setattr(_kernels, "CudaHostPipeline", RecordingPipe, raising=False)
    monkeypatch.setattr(cuda_host, "warm_up", lambda device: None)
    return RecordingPipe.built


def _extension_pinned(chunk_bytes: int) -> int:
    """What HostPipeline::init allocates with cudaHostAlloc (csrc/cuda/host_pipeline.cpp): pin_in_[2] of
    chunk_bytes_, pin_out_[2] of chunk_bytes_ / 4, pin_scalars_ of 16 bytes."""
    return 2 * chunk_bytes + 2 * (chunk_bytes // 4) + 16


@pytest.mark.parametrize("chunk", [cuda_host.CHUNK_BYTES, 1000, (1 << 20) + 12345])
def test_the_footprint_is_what_the_quantizer_allocates(recording_pipe: list[int], chunk: int) -> None:
    """The pinned bytes the quantizer reports are those the extension allocates for the chunk size it
    is given (rounded as the extension rounds it), and the 4-bit method's footprint on a GPU is the
    default quantizer's: its pinned bytes and the tensors it keeps submitted."""
    q = cuda_host.CudaHostQuantizer(QuantType.NF4, 64, True, 0, chunk_bytes=chunk)
    (passed,) = recording_pipe
    assert passed % cuda_host.MIN_CHUNK_BYTES == 0
    assert passed >= cuda_host.MIN_CHUNK_BYTES
    assert passed == max(chunk, 1 << 16) // (1 << 16) * (1 << 16)  # host_pipeline.cpp's chunk_bytes_
    assert q.pinned_bytes == _extension_pinned(passed)

    default = cuda_host.CudaHostQuantizer(QuantType.NF4, 64, True, 0)  # what make_host_quantizer builds
    assert recording_pipe[-1] == cuda_host.CHUNK_BYTES
    opts = Options(quant_type="nf4")
    footprint = opts.method.device_footprint(opts, "cuda")
    assert footprint.pinned == default.pinned_bytes == _extension_pinned(32 << 20) == 83_886_096
    # the tensors in flight: as many as quantize_many keeps submitted
    items = [(f"w{i}", np.ones(256, np.float32), "F32") for i in range(5)]
    assert len(list(default.quantize_many(items))) == 5
    assert default._pipe.most == footprint.in_flight == 2
    assert opts.method.device_footprint(opts, "cpu") == DeviceFootprint()


def _plan(tiny_checkpoint, monkeypatch: pytest.MonkeyPatch, **options) -> list:
    """The plans (and devices) a dry run of the tiny Llama hands the preflight, with ``--device cuda``
    taken as usable (no GPU is touched: a dry run builds no quantizer)."""
    seen: list = []
    original = preflight.preflight_of

    def spy(plan, *args, **kwargs):
        seen.append((plan, kwargs.get("device")))
        return original(plan, *args, **kwargs)

    monkeypatch.setattr(preflight, "preflight_of", spy)
    monkeypatch.setattr(pipeline, "resolve_device", lambda device: (device, None))
    src = tiny_checkpoint("llama")
    for device in ("cpu", "cuda"):
        pipeline.convert(
            src, Path("/nonexistent/out"), dry_run=True, progress=False, device=device, **options
        )
    return seen


@pytest.mark.parametrize(
    ("cast", "shard_size"),
    [(None, "5GB"), ("float16", "5GB"), ("float16", "20KB")],
    ids=["no-cast", "float16-cast", "float16-cast-small-shards"],
)
def test_the_bound_on_cuda_adds_the_pinned_staging_and_the_tensor_in_flight(
    tiny_checkpoint, monkeypatch: pytest.MonkeyPatch, cast: str | None, shard_size: str
) -> None:
    """The bound on a GPU: the pinned staging, and while a tensor is read (its cast copy and
    temporaries) the one in flight beside it (its copy and output). Small shards with a cast make the
    tensors' moment the larger one, so the tensor in flight decides the bound there."""
    (plan, cpu), (same, cuda) = _plan(
        tiny_checkpoint, monkeypatch, quant_type="nf4", dtype=cast, max_shard_size=shard_size
    )
    assert (cpu, cuda) == ("cpu", "cuda")  # the pipeline hands the preflight the device it runs on
    opts = plan.options
    outputs = sorted((preflight.output_bytes(p, opts) for p in plan.tensors), reverse=True)
    copies = [preflight.cast_copy(p, opts) for p in plan.tensors]
    assert any(c for c, _ in copies) == (cast is not None)
    pending = QualityMeter.MAX_PENDING
    # brute force: while tensor i is read (its copy and the cast's temporaries), tensor j (another one)
    # is in flight with its copy; the outputs of both and of the meter's pending ones are alive
    reading = max(c + t for c, t in copies)
    both = max(
        copies[i][0] + copies[i][1] + copies[j][0] for i, j in itertools.permutations(range(len(copies)), 2)
    )
    held = sum(outputs[:pending])
    # a shard closing: the meter's pending outputs, the last input copy, the hash buffers (no tensor in
    # flight: the shard's quantize_many is done)
    closing = held + max(c for c, _ in copies)
    closing += max(
        min(s.nbytes + preflight.header_bytes(s), preflight.HASH_CHUNKS_HELD * CHUNK_BYTES)
        for s in plan.shards
    )
    cpu_bound = preflight.working_set_bound(plan, "cpu")
    cuda_bound = preflight.working_set_bound(plan, "cuda")
    assert cpu_bound == preflight.RUN_OVERHEAD + max(reading + sum(outputs[: pending + 1]), closing)
    pinned = cuda_host.pinned_bytes()
    assert cuda_bound == preflight.RUN_OVERHEAD + pinned + max(both + sum(outputs[: pending + 2]), closing)
    if shard_size == "20KB":  # the moment of the tensors decides, on both devices
        assert reading + sum(outputs[: pending + 1]) > closing
        assert cuda_bound - cpu_bound == pinned + (both - reading) + outputs[pending + 1]
    assert cuda_bound - cpu_bound >= pinned == 83_886_096
    assert preflight.working_set_bound(same, "cuda") == cuda_bound


def test_int8_on_cuda_counts_torch_not_pinned_staging(
    tiny_checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """int8's GPU path goes through torch (``.to(device)``, ``.cpu()``): no staging of its own, one tensor
    at a time; torch's import is counted when the process has not imported it."""
    (plan, _), _ = _plan(tiny_checkpoint, monkeypatch, quant_type="int8")
    opts = plan.options
    assert opts.method.device_footprint(opts, "cuda") == DeviceFootprint(imports_torch=True)
    assert opts.method.device_footprint(opts, "cpu") == DeviceFootprint()
    cpu_bound = preflight.working_set_bound(plan, "cpu")
    assert preflight.working_set_bound(plan, "cuda") == cpu_bound  # torch is imported here
    monkeypatch.delitem(sys.modules, "torch")
    assert preflight.working_set_bound(plan, "cuda") == cpu_bound + preflight.TORCH_IMPORT
    assert preflight.working_set_bound(plan, "cpu") == cpu_bound
