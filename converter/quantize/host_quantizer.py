"""The quantizer the converter streams tensors through, on numpy arrays (the CPU path imports no torch).

Items are ``(name, array, dtype code)`` (bf16 as uint16 bits, as ``MappedFile.get_array`` gives
them); results are ``(name, HostResult)`` in the same order, numpy arrays on the host.

- ``HostQuantizer``: the CPU kernels through ``converter.kernels.bnb4bit_np`` (one tensor at a time).
- ``--device cuda``: ``converter.quantize.cuda_host.CudaHostQuantizer``: the same items quantized on the GPU
by
  the extension (pinned staging, overlapped copies; no torch either).

Both give the bytes of ``converter.kernels.bnb4bit``; ``fallback_reason`` says why a cuda request runs on the
CPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from converter.kernels import bnb4bit_np as kernels_np
from formats.quant_types import QuantType, check_blocksize

#: (tensor name, C-contiguous array, safetensors dtype code)
Item = tuple[str, np.ndarray, str]


@dataclass
class HostStats:
    tensors: int = 0
    bytes_in: int = 0


class HostResult(NamedTuple):
    packed: np.ndarray  # uint8 [(n+1)//2]
    absmax: np.ndarray  # float32 [nb]
    nested: tuple[np.ndarray, np.ndarray, float] | None  # (codes u8 [nb], nested_absmax f32, offset)


def nonfinite(name: str) -> kernels_np.NonFiniteInputError:
    """The error for a tensor holding NaN/Inf; ``.tensor`` names it (the converter adds file and --skip)."""
    exc = kernels_np.NonFiniteInputError(f"tensor {name!r} holds NaN or Inf: it cannot be quantized")
    exc.tensor = name  # type: ignore[attr-defined]
    return exc


class HostQuantizer:
    """CPU quantization of numpy arrays, one at a time (nothing held between items)."""

    def __init__(
        self,
        quant_type: QuantType,
        blocksize: int,
        nested: bool,
        *,
        threads: int | None = None,
        fallback_reason: str = "",
    ) -> None:
        self.quant_type, self.blocksize, self.nested = quant_type, check_blocksize(blocksize), nested
        self.threads, self.fallback_reason = threads, fallback_reason
        self.stats = HostStats()

    def quantize(self, name: str, x: np.ndarray, dtype: str) -> HostResult:
        try:
            packed, absmax = kernels_np.quantize_4bit(
                x, dtype, blocksize=self.blocksize, quant_type=self.quant_type, threads=self.threads
            )
        except kernels_np.NonFiniteInputError:
            raise nonfinite(name) from None
        nested = kernels_np.quantize_nested(absmax, threads=self.threads) if self.nested else None
        self.stats.tensors += 1
        self.stats.bytes_in += x.nbytes
        return HostResult(packed, absmax, nested)

    def quantize_many(self, items: Iterable[Item]) -> Iterator[tuple[str, HostResult]]:
        for name, x, dtype in items:
            done = [(name, self.quantize(name, x, dtype))]
            del x  # the caller's map is dropped once quantized
            yield done.pop()
