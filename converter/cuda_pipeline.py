"""Quantize a stream of host torch tensors on the GPU with copies and kernels overlapped.

For Python callers holding torch tensors (and bench/bench_cuda_convert.py). The converter's
``--device cuda`` no longer comes here: it quantizes numpy buffers through ``converter.cuda_host``
(the extension's own pinned staging, no torch).

Usage (the converter's pipeline; results come back in submission order, on the host, as the CPU
path returns them)::

    from converter.cuda_pipeline import make_quantizer

    q = make_quantizer(QuantType.NF4, blocksize=64, nested=True)   # CudaQuantizer, or the CPU one
    if q.fallback_reason:
        console.print(q.fallback_reason)                           # "no GPU: quantizing on the CPU"
    for name, r in q.quantize_many((name, tensor) for name, tensor in tensors):
        r.packed, r.absmax, r.nested                               # CPU tensors; nested=(codes, nabs, offset)

How a tensor flows (depth 2: while tensor k is quantized, k+1 goes up and k-1 comes down):

1. the caller's generator produces tensor k (disk read / mmap) while the GPU works on k-1;
2. it is copied into a pinned staging slot (two slots, reused once their upload finished);
3. the upload runs on an upload stream; the kernels wait for it on a compute stream;
4. packed codes, absmax and nested absmax go back to pinned host tensors on the compute stream;
5. the result of tensor k-1 is yielded once its copy back has finished.

Bytes are those of ``converter.kernels`` on the CPU (the CUDA kernels are byte-identical).
``stats`` adds up seconds of staging (host memcpy), upload, kernels and download (CUDA events).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from converter import kernels
from formats.quant_types import QuantType, check_blocksize

__all__ = ["CpuQuantizer", "CudaQuantizer", "QuantResult", "make_quantizer"]


class QuantResult(NamedTuple):
    """One quantized tensor on the host: what ``kernels.quantize_4bit`` (+ ``quantize_nested``) give."""

    packed: torch.Tensor  # uint8 [(n+1)//2]
    absmax: torch.Tensor  # float32 [nb]
    nested: tuple[torch.Tensor, torch.Tensor, float] | None  # (codes u8 [nb], nested_absmax f32, offset)


@dataclass
class Stats:
    tensors: int = 0
    bytes_in: int = 0
    seconds_stage: float = 0.0  # host copy into pinned memory
    seconds_upload: float = 0.0  # host -> device (CUDA events)
    seconds_kernels: float = 0.0
    seconds_download: float = 0.0  # device -> host
    seconds_wait: float = 0.0  # host time blocked waiting for results
    extra: dict = field(default_factory=dict)


def _nonfinite(name: str) -> Exception:
    msg = f"tensor {name!r} holds NaN or Inf: it cannot be quantized"
    exc = kernels.NonFiniteInputError(msg)
    exc.tensor = name  # type: ignore[attr-defined]  # the converter names the file and --skip from it
    return exc


class CpuQuantizer:
    """The same interface on the CPU kernels (used when no GPU is usable)."""

    def __init__(
        self, quant_type: QuantType, blocksize: int, nested: bool, fallback_reason: str = "", threads=None
    ) -> None:
        self.quant_type, self.blocksize, self.nested = quant_type, check_blocksize(blocksize), nested
        self.fallback_reason = fallback_reason
        self.threads = threads
        self.stats = Stats()

    def quantize(self, name: str, x: torch.Tensor) -> QuantResult:
        try:
            packed, absmax = kernels.quantize_4bit(
                x.contiguous(), blocksize=self.blocksize, quant_type=self.quant_type, threads=self.threads
            )
        except kernels.NonFiniteInputError:
            raise _nonfinite(name) from None
        nested = kernels.quantize_nested(absmax, threads=self.threads) if self.nested else None
        self.stats.tensors += 1
        self.stats.bytes_in += x.numel() * x.element_size()
        return QuantResult(packed, absmax, nested)

    def quantize_many(self, items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, QuantResult]]:
        for name, x in items:
            # Nothing held here while the caller has the result: its input and output are freed as
            # soon as the caller drops them (a list popped into the yield, not a local).
            done = [(name, self.quantize(name, x))]
            del x
            yield done.pop()


class _InFlight(NamedTuple):
    name: str
    nbytes: int
    packed: torch.Tensor
    absmax: torch.Tensor
    codes: torch.Tensor | None
    nested_absmax: torch.Tensor | None
    scalars: torch.Tensor  # pinned float32 [2]: (non-finite flag, offset)
    events: tuple  # (upload start, upload end, kernels end, download end)
    keep: tuple  # device tensors alive until the download finished


class CudaQuantizer:
    """Overlapped host -> GPU -> host quantization of many tensors (see the module docstring)."""

    def __init__(
        self, quant_type: QuantType, blocksize: int, nested: bool, device: str | torch.device = "cuda"
    ) -> None:
        from converter import kernels_cuda

        usable, why = kernels_cuda.cuda_status()
        if not usable:
            raise RuntimeError(why)
        self._kc = kernels_cuda
        self.quant_type, self.blocksize, self.nested = quant_type, check_blocksize(blocksize), nested
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.fallback_reason = ""
        self.stats = Stats()
        self._upload = torch.cuda.Stream(self.device)
        self._compute = torch.cuda.Stream(self.device)
        self._slots: list[torch.Tensor | None] = [None, None]  # pinned staging buffers (uint8)
        self._slot_free: list[torch.cuda.Event | None] = [None, None]
        self._next_slot = 0

    def _stage(self, x: torch.Tensor) -> torch.Tensor:
        """Copy x into a pinned slot (waiting until the slot's previous upload finished)."""
        t0 = time.perf_counter()
        s = self._next_slot
        self._next_slot ^= 1
        if self._slot_free[s] is not None:
            self._slot_free[s].synchronize()
        nbytes = x.numel() * x.element_size()
        buf = self._slots[s]
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8, pin_memory=True)
            self._slots[s] = buf
        staged = buf[:nbytes].view(x.dtype)
        staged.copy_(x.reshape(-1))
        self.stats.seconds_stage += time.perf_counter() - t0
        return staged, s

    def _submit(self, name: str, x: torch.Tensor) -> _InFlight:
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            msg = f"tensor {name!r} has dtype {x.dtype}: expected float32, float16 or bfloat16"
            raise ValueError(msg)
        staged, slot = self._stage(x)
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        with torch.cuda.stream(self._upload):
            ev[0].record()
            dev_x = torch.empty(staged.numel(), dtype=x.dtype, device=self.device)
            dev_x.copy_(staged, non_blocking=True)
            ev[1].record()
        free = torch.cuda.Event()
        free.record(self._upload)
        self._slot_free[slot] = free
        with torch.cuda.stream(self._compute):
            self._compute.wait_event(ev[1])
            dev_x.record_stream(self._compute)
            packed_d, absmax_d, flag_d = self._kc._launch_quantize(dev_x, self.blocksize, self.quant_type)
            codes_d = nabs_d = None
            if self.nested:
                codes_d, nabs_d, off_d = self._kc._launch_nested(absmax_d)
                scalars_d = torch.cat([flag_d.to(torch.float32), off_d])
            else:
                scalars_d = torch.cat([flag_d.to(torch.float32), torch.zeros(1, device=self.device)])
            ev[2].record()
            pin = {"pin_memory": True}
            packed = torch.empty(packed_d.shape, dtype=torch.uint8, **pin)
            absmax = torch.empty(absmax_d.shape, dtype=torch.float32, **pin)
            scalars = torch.empty(2, dtype=torch.float32, **pin)
            packed.copy_(packed_d, non_blocking=True)
            absmax.copy_(absmax_d, non_blocking=True)
            scalars.copy_(scalars_d, non_blocking=True)
            codes = nabs = None
            if self.nested:
                codes = torch.empty(codes_d.shape, dtype=torch.uint8, **pin)
                nabs = torch.empty(nabs_d.shape, dtype=torch.float32, **pin)
                codes.copy_(codes_d, non_blocking=True)
                nabs.copy_(nabs_d, non_blocking=True)
            ev[3].record()
        keep = (dev_x, packed_d, absmax_d, codes_d, nabs_d, scalars_d)
        return _InFlight(
            name, staged.numel() * x.element_size(), packed, absmax, codes, nabs, scalars, tuple(ev), keep
        )

    def _finish(self, f: _InFlight) -> QuantResult:
        t0 = time.perf_counter()
        f.events[3].synchronize()
        self.stats.seconds_wait += time.perf_counter() - t0
        e = f.events
        self.stats.seconds_upload += e[0].elapsed_time(e[1]) / 1e3
        self.stats.seconds_kernels += e[1].elapsed_time(e[2]) / 1e3
        self.stats.seconds_download += e[2].elapsed_time(e[3]) / 1e3
        self.stats.tensors += 1
        self.stats.bytes_in += f.nbytes
        bad, offset = f.scalars.tolist()
        if bad:
            raise _nonfinite(f.name)
        nested = (f.codes, f.nested_absmax, float(offset)) if self.nested else None
        return QuantResult(f.packed, f.absmax, nested)

    def quantize(self, name: str, x: torch.Tensor) -> QuantResult:
        return self._finish(self._submit(name, x))

    def _take(self, pending: collections.deque[_InFlight]) -> tuple[str, QuantResult]:
        f = pending.popleft()
        return f.name, self._finish(f)

    def quantize_many(
        self, items: Iterable[tuple[str, torch.Tensor]], depth: int = 2
    ) -> Iterator[tuple[str, QuantResult]]:
        """Results in order; up to ``depth`` tensors in flight while the next one is read."""
        pending: collections.deque[_InFlight] = collections.deque()
        try:
            for name, x in items:
                pending.append(self._submit(name, x))
                del x  # staged in pinned memory: the caller may read the next one
                if len(pending) >= depth:
                    done = [self._take(pending)]  # popped into the yield: the caller owns the result
                    yield done.pop()
            while pending:
                done = [self._take(pending)]
                yield done.pop()
        finally:
            # Stopped early (an error, or the caller closed us): let the copies in flight finish
            # before their pinned buffers and device tensors are dropped.
            for f in pending:
                f.events[3].synchronize()


def make_quantizer(
    quant_type: QuantType, blocksize: int, nested: bool, device: str = "cuda", threads: int | None = None
) -> CudaQuantizer | CpuQuantizer:
    """A CudaQuantizer when the CUDA backend is usable, else a CpuQuantizer whose ``fallback_reason``
    says why (print it: the conversion still runs, on the CPU, with the same bytes)."""
    try:
        from converter import kernels_cuda

        usable, why = kernels_cuda.cuda_status()
    except (ImportError, AttributeError) as exc:
        usable, why = False, f"the CUDA backend cannot be loaded ({exc})"
    if usable:
        return CudaQuantizer(quant_type, blocksize, nested, device)
    reason = f"--device cuda: {why}; quantizing on the CPU instead (same bytes, slower)"
    return CpuQuantizer(quant_type, blocksize, nested, fallback_reason=reason, threads=threads)
