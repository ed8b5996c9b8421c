"""Quantize a stream of host torch tensors on the GPU: the torch-tensor face of
``converter.quantize.cuda_host``.

For Python callers holding torch tensors (and bench/bench_cuda_convert.py). The converter's
``--device cuda`` does not come here: it hands numpy buffers to ``converter.quantize.cuda_host`` directly (no
torch). Both run the same GPU pipeline (``_kernels.CudaHostPipeline``, csrc/cuda/host_pipeline.*);
this module only views the tensors as numpy arrays and the results as tensors (no copies).

Usage (results come back in submission order, on the host, as the CPU path returns them)::

    from converter.quantize.cuda_pipeline import make_quantizer

    q = make_quantizer(QuantType.NF4, blocksize=64, nested=True)   # CudaQuantizer, or the CPU one
    if q.fallback_reason:
        console.print(q.fallback_reason)                           # "no GPU: quantizing on the CPU"
    for name, r in q.quantize_many((name, tensor) for name, tensor in tensors):
        r.packed, r.absmax, r.nested                               # CPU tensors; nested=(codes, nabs, offset)

Up to ``depth`` = 2 tensors are in flight: the extension's worker quantizes tensor k (chunked copies
into pinned memory overlapped with upload, kernels and download) while the caller uses tensor k-1.
Bytes are those of ``converter.kernels.bnb4bit`` on the CPU (the CUDA kernels are byte-identical).
``stats`` adds up seconds of staging (host memcpy), upload, kernels and download (CUDA events).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from converter.kernels import bnb4bit as kernels
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


_HOST_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _as_numpy(name: str, x: torch.Tensor) -> tuple[np.ndarray, str]:
    """A host tensor's elements as a numpy array (a view; bf16 as its uint16 bits) and dtype code."""
    if x.dtype not in _HOST_CODES:
        msg = f"tensor {name!r} has dtype {x.dtype}: expected float32, float16 or bfloat16"
        raise ValueError(msg)
    x = x.detach().reshape(-1).contiguous().cpu()
    bits = x.view(torch.int16).numpy().view(np.uint16) if x.dtype == torch.bfloat16 else x.numpy()
    return bits, _HOST_CODES[x.dtype]


class CudaQuantizer:
    """GPU quantization of many host torch tensors (see the module docstring)."""

    def __init__(
        self, quant_type: QuantType, blocksize: int, nested: bool, device: str | torch.device = "cuda"
    ) -> None:
        from converter.kernels import bnb4bit_cuda as kernels_cuda
        from converter.quantize import cuda_host

        usable, why = kernels_cuda.cuda_status()
        if not usable:
            raise RuntimeError(why)
        self.quant_type, self.blocksize, self.nested = quant_type, check_blocksize(blocksize), nested
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.fallback_reason = ""
        self._q = cuda_host.CudaHostQuantizer(quant_type, blocksize, nested, self.device.index)
        self.stats = self._q.stats

    def quantize(self, name: str, x: torch.Tensor) -> QuantResult:
        return next(self.quantize_many([(name, x)]))[1]

    def quantize_many(
        self, items: Iterable[tuple[str, torch.Tensor]], depth: int = 2
    ) -> Iterator[tuple[str, QuantResult]]:
        """Results in order; up to ``depth`` tensors in flight while the next one is read."""
        results = self._q.quantize_many(((name, *_as_numpy(name, x)) for name, x in items), depth)
        try:
            for name, r in results:
                nested = None
                if r.nested is not None:
                    codes, nested_absmax, offset = r.nested
                    nested = (torch.from_numpy(codes), torch.from_numpy(nested_absmax), offset)
                done = [(name, QuantResult(torch.from_numpy(r.packed), torch.from_numpy(r.absmax), nested))]
                del r
                yield done.pop()  # popped into the yield: the caller owns the result
        finally:
            results.close()  # stopped early: waits for what the worker still reads or writes


def make_quantizer(
    quant_type: QuantType, blocksize: int, nested: bool, device: str = "cuda", threads: int | None = None
) -> CudaQuantizer | CpuQuantizer:
    """A CudaQuantizer when the CUDA backend is usable, else a CpuQuantizer whose ``fallback_reason``
    says why (print it: the conversion still runs, on the CPU, with the same bytes)."""
    try:
        from converter.kernels import bnb4bit_cuda as kernels_cuda

        usable, why = kernels_cuda.cuda_status()
    except (ImportError, AttributeError) as exc:
        usable, why = False, f"the CUDA backend cannot be loaded ({exc})"
    if usable:
        return CudaQuantizer(quant_type, blocksize, nested, device)
    reason = f"--device cuda: {why}; quantizing on the CPU instead (same bytes, slower)"
    return CpuQuantizer(quant_type, blocksize, nested, fallback_reason=reason, threads=threads)
