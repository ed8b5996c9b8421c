"""``--device cuda`` without torch: numpy host buffers quantized on the GPU by the extension.

``CudaHostQuantizer`` has ``host_quantizer.HostQuantizer``'s interface (items ``(name, array, dtype
code)``, results ``(name, HostResult)`` in order) and the bytes of the CPU kernels. The work is done by
``converter._kernels.CudaHostPipeline`` (csrc/cuda/host_pipeline.*): one worker thread per quantizer
streams each tensor through pinned staging in chunks (host copy of chunk c+1 on the CPU thread pool
while the GPU uploads, quantizes and downloads chunk c), nests the whole tensor's absmax on the device
and writes the results into numpy arrays allocated here. ``quantize_many`` keeps up to ``depth`` = 2
tensors submitted, so the worker quantizes tensor k while the converter writes tensor k-1.

Also here, torch-free: whether the CUDA backend can run (``cuda_status``: no CUDA build, no device,
driver too old, GPU older than compute capability 8.0), the device list (``backend_info``), and
``warm_up(device)``, which creates the CUDA context on a thread so it overlaps planning and the first
reads. ``converter.kernels.bnb4bit_cuda`` (the torch face of the same kernels) builds on the same checks.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from converter import _kernels
from converter.kernels import bnb4bit_np as kernels_np
from converter.quantize.host_quantizer import HostQuantizer, HostResult, Item, nonfinite
from formats import codebooks
from formats.quant_types import QuantType, check_blocksize, n_blocks, n_nested_blocks

__all__ = ["MIN_CAPABILITY", "CudaHostQuantizer", "backend_info", "cuda_status", "device_index", "warm_up"]

#: Oldest compute capability the CUDA build runs on (CMakeLists.txt: sm_80 and sm_90 SASS, compute_90 PTX).
MIN_CAPABILITY = (8, 0)

#: Input bytes per chunk: two pinned input slots of this size, two pinned output slots of a quarter.
CHUNK_BYTES = 32 << 20
#: The extension rounds the chunk down to a multiple of this, and up to one (host_pipeline.cpp's
#: kMinChunkBytes: at least 4 bytes x the largest blocksize).
MIN_CHUNK_BYTES = 1 << 16
#: Tensors ``quantize_many`` keeps submitted: the worker quantizes tensor k while the converter writes
#: tensor k-1 (each one's input and output arrays alive meanwhile).
DEPTH = 2


def staging_chunk(chunk_bytes: int = CHUNK_BYTES) -> int:
    """The input bytes per chunk the extension stages: ``chunk_bytes`` rounded as it rounds them."""
    return max(int(chunk_bytes), MIN_CHUNK_BYTES) // MIN_CHUNK_BYTES * MIN_CHUNK_BYTES


def pinned_bytes(chunk_bytes: int = CHUNK_BYTES) -> int:
    """Pinned host memory a ``CudaHostQuantizer`` holds for the whole conversion
    (csrc/cuda/host_pipeline.cpp's ``cudaHostAlloc`` calls): two input slots of a chunk, two output slots
    of a quarter of one (packed codes), 16 bytes of scalars. The preflight counts it
    (``converter.plan.preflight.working_set_bound``)."""
    chunk = staging_chunk(chunk_bytes)
    return 2 * chunk + 2 * (chunk // 4) + 16


#: dtype codes of csrc/cuda/qm_cuda.h (DType), by safetensors dtype code.
DTYPE_CODES = {"F32": 0, "F16": 1, "BF16": 2}


def cuda_status() -> tuple[bool, str]:
    """``(usable, reason)``: usable is False with a one-line reason (no CUDA build, no device, old
    driver, or a GPU older than compute capability 8.0). Imports no torch."""
    if not getattr(_kernels, "has_cuda_build", lambda: False)():
        return False, "this build of quantize-model has no CUDA backend (it was built without nvcc)"
    if not hasattr(_kernels, "CudaHostPipeline"):
        return False, (
            "converter._kernels was built before its CUDA host pipeline existed: rebuild it "
            "(pip install --no-build-isolation -e .)"
        )
    count, why = _kernels.cuda_available()
    if count == 0:
        return False, why
    for i in range(count):  # the kernels are built for compute capability 8.0 and newer (sm_80, sm_90, PTX)
        info = _kernels.cuda_device_info(i)
        major, minor = info["capability"]
        if major < MIN_CAPABILITY[0]:
            return False, (
                f"GPU {i} ({info['name']}) has compute capability {major}.{minor}; this build's CUDA kernels "
                f"need {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (A100, RTX 30 series, H100 and later)"
            )
    return True, ""


def backend_info() -> dict | None:
    """``{"devices": [{"name", "capability", "multiprocessors", "total_memory", "l2_bytes"}, ...]}``,
    None when ``cuda_status()`` says the backend is not usable."""
    if not cuda_status()[0]:
        return None
    count, _ = _kernels.cuda_available()
    devices = []
    for i in range(count):
        d = dict(_kernels.cuda_device_info(i))
        d["capability"] = "{}.{}".format(*d["capability"])
        devices.append(d)
    return {"devices": devices}


def device_index(device: str) -> int:
    """The CUDA device index of ``"cuda"`` (0) or ``"cuda:N"``; ValueError naming the devices there are."""
    if device == "cuda":
        return 0
    text = device.removeprefix("cuda:")
    if not device.startswith("cuda:") or not text.isdigit():
        msg = f"--device {device!r}: expected cuda or cuda:N (N a device index)"
        raise ValueError(msg)
    count, _ = _kernels.cuda_available()
    if int(text) >= count:
        msg = f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
        raise ValueError(msg)
    return int(text)


_warmed: set[int] = set()
_warm_lock = threading.Lock()


def warm_up(device: int) -> None:
    """Create ``device``'s CUDA context on a background thread (once per process): the few hundred ms
    it takes overlap planning and reading instead of delaying the first tensor. Not a daemon thread,
    so the interpreter waits for it before exiting; a failure is left for the quantizer to report."""
    with _warm_lock:
        if device in _warmed:
            return
        _warmed.add(device)

    def init() -> None:
        try:
            _kernels.cuda_init(device)
        except RuntimeError:
            pass  # the quantizer's own set-up reports it, naming the call

    threading.Thread(target=init, name=f"qm-cuda-init-{device}").start()


@dataclass
class DeviceStats:
    """What ``quantization_report.json`` ``timings.device`` holds (seconds; upload/kernels/download
    from CUDA events, stage = host copies into pinned memory, wait = the converter blocked on results)."""

    tensors: int = 0
    bytes_in: int = 0
    seconds_stage: float = 0.0
    seconds_upload: float = 0.0
    seconds_kernels: float = 0.0
    seconds_download: float = 0.0
    seconds_wait: float = 0.0


class _Pending:
    """One tensor submitted (or, empty, already done on the CPU): its input and output buffers stay
    referenced here until the worker is done with them."""

    __slots__ = ("absmax", "codes", "done", "name", "nested_absmax", "packed", "ticket", "x")

    def __init__(self, name: str, x: np.ndarray) -> None:
        self.name, self.x = name, x
        self.ticket = 0
        self.done: HostResult | None = None


class CudaHostQuantizer:
    """``--device cuda``: the host_quantizer interface on ``_kernels.CudaHostPipeline`` (no torch)."""

    def __init__(
        self,
        quant_type: QuantType,
        blocksize: int,
        nested: bool,
        device: int = 0,
        *,
        threads: int | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        self.quant_type, self.blocksize, self.nested = quant_type, check_blocksize(blocksize), nested
        self.threads = threads
        self.device = f"cuda:{device}"
        self.fallback_reason = ""
        self.stats = DeviceStats()
        #: the pinned staging this quantizer holds (``pinned_bytes``: what the preflight counts)
        self.pinned_bytes = pinned_bytes(chunk_bytes)
        warm_up(device)  # usually already started by pipeline.resolve_device
        mids = [float(v) for v in np.asarray(codebooks.DYNAMIC8_MIDPOINTS, dtype=np.float32)]
        threads_arg = kernels_np.threads_arg(threads)
        self._pipe = _kernels.CudaHostPipeline(
            device, int(quant_type), self.blocksize, nested, staging_chunk(chunk_bytes), threads_arg, mids
        )
        self._cpu = HostQuantizer(quant_type, blocksize, nested, threads=threads)  # empty tensors only

    def _submit(self, name: str, x: np.ndarray, dtype: str) -> _Pending:
        kernels_np.check_input(x, dtype)
        p = _Pending(name, x)
        if x.size == 0:  # nothing to upload: the CPU kernels' (empty) outputs and offset
            p.done = self._cpu.quantize(name, x, dtype)
            return p
        nb = n_blocks(x.size, self.blocksize)
        p.packed = np.empty((x.size + 1) // 2, dtype=np.uint8)
        p.absmax = np.empty(nb, dtype=np.float32)
        p.codes = np.empty(nb, dtype=np.uint8) if self.nested else None
        p.nested_absmax = np.empty(n_nested_blocks(nb), dtype=np.float32) if self.nested else None
        p.ticket = self._pipe.submit(
            kernels_np.address(x),
            DTYPE_CODES[dtype],
            x.size,
            kernels_np.address(p.packed),
            kernels_np.address(p.absmax),
            kernels_np.address(p.codes) if self.nested else 0,
            kernels_np.address(p.nested_absmax) if self.nested else 0,
        )
        self.stats.tensors += 1
        self.stats.bytes_in += x.nbytes
        return p

    def _finish(self, p: _Pending) -> tuple[str, HostResult]:
        if p.done is not None:
            return p.name, p.done
        t0 = time.perf_counter()
        bad, offset, stage, upload, kernels, download = self._pipe.wait(p.ticket)
        s = self.stats
        s.seconds_wait += time.perf_counter() - t0
        s.seconds_stage += stage
        s.seconds_upload += upload
        s.seconds_kernels += kernels
        s.seconds_download += download
        p.ticket = 0
        if bad:
            raise nonfinite(p.name)
        nested = (p.codes, p.nested_absmax, float(offset)) if self.nested else None
        return p.name, HostResult(p.packed, p.absmax, nested)

    def quantize_many(self, items: Iterable[Item], depth: int = DEPTH) -> Iterator[tuple[str, HostResult]]:
        """Results in order; up to ``depth`` tensors submitted while the oldest one's result is used."""
        if depth < 1:
            msg = f"depth must be >= 1, got {depth}"
            raise ValueError(msg)
        pending: collections.deque[_Pending] = collections.deque()
        try:
            for name, x, dtype in items:
                pending.append(self._submit(name, x, dtype))
                del x  # referenced by the pending entry until the worker is done with it
                if len(pending) >= depth:
                    done = [self._finish(pending.popleft())]  # popped into the yield: the caller owns it
                    yield done.pop()
            while pending:
                done = [self._finish(pending.popleft())]
                yield done.pop()
        finally:
            # Stopped early (an error, or the caller closed us): the worker may still read the inputs
            # and write the outputs of what was submitted; wait for it before they are dropped.
            for p in pending:
                if p.ticket:
                    try:
                        self._pipe.wait(p.ticket)
                    except (RuntimeError, ValueError):
                        pass  # the first error is the one being raised
