"""Which torch-free host path runs: the CPU one (``converter.quantize.host_quantizer``,
``converter.kernels.bnb4bit_np``)
or the CUDA host pipeline (``converter.quantize.cuda_host``), for ``convert --device`` and ``--version``.

Its own module because the CUDA side builds on the CPU side (``cuda_host`` imports
``host_quantizer`` and ``kernels_np``): the choice between them cannot live in either without an
import cycle.
"""

from __future__ import annotations

from typing import Any

from converter import _kernels
from converter.kernels.bnb4bit_np import cpu_backend_info
from converter.quantize import cuda_host
from converter.quantize.host_quantizer import HostQuantizer
from formats.quant_types import QuantType

__all__ = ["available_backends", "make_host_quantizer"]


def make_host_quantizer(
    quant_type: QuantType, blocksize: int, nested: bool, device: str, threads: int | None
) -> Any:
    """The quantizer for ``device`` ("cpu", "cuda", "cuda:N"): ``HostQuantizer``, or
    ``converter.quantize.cuda_host.CudaHostQuantizer`` (no torch either); a CPU one with ``fallback_reason``
    set
    when the CUDA backend is unusable (same bytes)."""
    if device == "cpu":
        return HostQuantizer(quant_type, blocksize, nested, threads=threads)
    usable, why = cuda_host.cuda_status()
    if not usable:
        reason = f"--device {device}: {why}; quantizing on the CPU instead (same bytes, slower)"
        return HostQuantizer(quant_type, blocksize, nested, threads=threads, fallback_reason=reason)
    index = cuda_host.device_index(device)
    return cuda_host.CudaHostQuantizer(quant_type, blocksize, nested, index, threads=threads)


def available_backends() -> dict[str, dict]:
    """``converter.kernels.bnb4bit.available_backends()`` without torch: the "cuda" entry is
    ``converter.quantize.cuda_host.backend_info()`` (what the extension sees; torch is not asked)."""
    backends = {"cpu": cpu_backend_info()}
    if _kernels.has_cuda_build():
        info = cuda_host.backend_info()
        if info is not None:
            backends["cuda"] = info
    return backends
