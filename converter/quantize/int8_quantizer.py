"""Quantize a stream of host tensors to LLM.int8 for the converter (the int8 twin of cuda_pipeline).

``quantize_many`` takes (name, contiguous 2-D [out, in] tensor) pairs and yields (name, Int8Result)
in order, one tensor in memory at a time. On ``--device cuda`` each tensor is uploaded, quantized by
the CUDA kernel and copied back (same bytes as the CPU for the same ``scale``); without a usable CUDA
int8 kernel it runs on the CPU and says why in ``fallback_reason``.

bitsandbytes stores a row holding a value past fp16's range (|w| >= 65520, possible in bf16/fp32
checkpoints) as SCB = inf with all-zero codes, which loads as NaN; the same bytes are written here
and ``notes`` names the tensors, so the user can --skip them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch

from converter.kernels import bnb4bit as kernels
from converter.kernels import int8 as kernels_int8
from converter.quantize.cuda_pipeline import Stats, _nonfinite


class Int8Result(NamedTuple):
    codes: torch.Tensor  # int8 [out, in]
    scb: torch.Tensor  # float32 [out]


class Int8Quantizer:
    """LLM.int8 quantization of many tensors (CPU kernels, or the CUDA ones when ``device`` is a GPU)."""

    def __init__(self, scale: str = "cpu", device: str = "cpu", threads: int | None = None) -> None:
        kernels_int8.scale_table(scale)  # validates the name
        self.scale, self.threads = scale, threads
        self.device = "cpu"
        self.fallback_reason = ""
        self.notes: list[str] = []
        self.stats = Stats()
        self._overflow: list[str] = []
        if device != "cpu":
            usable, why = _cuda_usable()
            if usable:
                self.device = device
            else:
                self.fallback_reason = f"--device {device}: {why}; quantizing int8 on the CPU (same bytes)"

    def quantize(self, name: str, x: torch.Tensor) -> Int8Result:
        try:
            if self.device != "cpu":
                codes, scb = kernels_int8.quantize_int8(x.to(self.device), scale=self.scale)
                codes, scb = codes.cpu(), scb.cpu()
            else:
                codes, scb = kernels_int8.quantize_int8(
                    x.contiguous(), scale=self.scale, threads=self.threads
                )
        except kernels.NonFiniteInputError:
            raise _nonfinite(name) from None
        overflow = int(torch.isinf(scb).sum())
        if overflow:
            self._overflow.append(f"{name} ({overflow} rows)")
            self.notes[:] = [
                "values past float16's range (|w| >= 65520) in "
                + ", ".join(self._overflow[:5])
                + (f" and {len(self._overflow) - 5} more" if len(self._overflow) > 5 else "")
                + ": stored as bitsandbytes does (SCB = inf, codes 0), those rows load as NaN; "
                "--skip those modules to keep them unquantized"
            ]
        self.stats.tensors += 1
        self.stats.bytes_in += x.numel() * x.element_size()
        return Int8Result(codes, scb)

    def quantize_many(self, items: Iterable[tuple]) -> Iterator[tuple[str, Int8Result]]:
        """(name, tensor) pairs, or the pipeline's (name, numpy array, safetensors dtype code) triples
        (bf16 arrives as its uint16 bits)."""
        for item in items:
            name, x = item[0], as_tensor(item[1], item[2] if len(item) > 2 else None)
            del item
            done = [(name, self.quantize(name, x))]  # popped into the yield: nothing held here
            del x
            yield done.pop()


_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def as_tensor(x: object, code: str | None) -> torch.Tensor:
    """A torch view of the pipeline's numpy input (no copy; bf16's uint16 bits viewed as bfloat16)."""
    if isinstance(x, torch.Tensor):
        return x
    t = torch.from_numpy(x)
    return t.view(_TORCH[code]) if code is not None and t.dtype != _TORCH[code] else t


def _cuda_usable() -> tuple[bool, str]:
    """Whether the CUDA backend (with its int8 kernels) can run here, and why not."""
    try:
        from converter.kernels import bnb4bit_cuda as kernels_cuda

        usable, why = kernels_cuda.cuda_status()
    except (ImportError, AttributeError, RuntimeError) as exc:
        return False, f"the CUDA backend cannot be loaded ({exc})"
    from converter.kernels import int8_cuda as kernels_int8_cuda

    if usable and not kernels_int8_cuda.available():
        return False, "this build's CUDA backend has no int8 kernels"
    return usable, why
