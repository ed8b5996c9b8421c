"""Quantize a stream of host tensors to LLM.int8 for the converter (the int8 twin of cuda_pipeline).

``quantize_many`` takes the pipeline's (name, 2-D [out, in] numpy array, dtype code) triples and yields
(name, Int8Result) in order, numpy arrays, one tensor in memory at a time. On the CPU no torch is
imported (``converter.kernels.int8_np``). On ``--device cuda`` each tensor is uploaded, quantized by the
CUDA kernel (through torch) and copied back (same bytes as the CPU for the same ``scale``); without a
usable CUDA int8 kernel it runs on the CPU and says why in ``fallback_reason``.

bitsandbytes stores a row holding a value past fp16's range (|w| >= 65520, possible in bf16/fp32
checkpoints) as SCB = inf with all-zero codes, which loads as NaN; the same bytes are written here
and ``notes`` names the tensors, so the user can --skip them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np

from converter.kernels import int8_np
from converter.quantize.host_quantizer import HostStats, nonfinite


class Int8Result(NamedTuple):
    codes: np.ndarray  # int8 [out, in]
    scb: np.ndarray  # float32 [out]


class Int8Quantizer:
    """LLM.int8 quantization of many tensors: the CPU kernels on numpy arrays (no torch, as the 4-bit
    ``HostQuantizer``), or the CUDA ones through torch when ``device`` is a usable GPU."""

    def __init__(self, scale: str = "cpu", device: str = "cpu", threads: int | None = None) -> None:
        int8_np.scale_table(scale)  # validates the name
        self.scale, self.threads = scale, threads
        self.device = "cpu"
        self.fallback_reason = ""
        self.notes: list[str] = []
        self.stats = HostStats()
        self._overflow: list[str] = []
        if device != "cpu":
            usable, why = _cuda_usable()
            if usable:
                self.device = device
            else:
                self.fallback_reason = f"--device {device}: {why}; quantizing int8 on the CPU (same bytes)"

    def quantize(self, name: str, x: Any, dtype: str | None = None) -> Int8Result:
        """``x``: a numpy array holding ``dtype`` values (bf16 as uint16 bits) or a torch tensor."""
        try:
            if self.device != "cpu":
                codes, scb = _quantize_cuda(x, dtype, self.device, self.scale)
            else:
                if not isinstance(x, np.ndarray):  # a torch tensor from a Python caller
                    x, dtype = _cpu_input(x)
                codes, scb = int8_np.quantize_int8(
                    np.ascontiguousarray(x), dtype or "", scale=self.scale, threads=self.threads
                )
        except int8_np.NonFiniteInputError:
            raise nonfinite(name) from None
        overflow = int(np.isinf(scb).sum())
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
        self.stats.bytes_in += x.nbytes if isinstance(x, np.ndarray) else x.numel() * x.element_size()
        return Int8Result(codes, scb)

    def quantize_many(self, items: Iterable[tuple]) -> Iterator[tuple[str, Int8Result]]:
        """The pipeline's (name, numpy array, safetensors dtype code) triples (bf16 arrives as its
        uint16 bits), or (name, torch tensor) pairs."""
        for item in items:
            name, x, dtype = item[0], item[1], item[2] if len(item) > 2 else None
            del item
            done = [(name, self.quantize(name, x, dtype))]  # popped into the yield: nothing held here
            del x
            yield done.pop()


def _cpu_input(t: Any) -> tuple[np.ndarray, str]:
    """A torch tensor as the CPU kernel's input: (numpy array, safetensors code), bf16 as uint16 bits."""
    x, code = int8_np.host_array(t)
    if code is None:
        msg = f"x has dtype {t.dtype}: expected float32, float16 or bfloat16"
        raise ValueError(msg)
    return x, code


def _quantize_cuda(x: Any, dtype: str | None, device: str, scale: str) -> tuple[np.ndarray, np.ndarray]:
    """The CUDA kernels through their torch face (imported here: the CPU path needs no torch)."""
    from converter.kernels import int8 as kernels_int8
    from converter.sources.mapped import as_torch

    if isinstance(x, np.ndarray):  # the pipeline's array (bf16 as its uint16 bits): a torch view of it
        x = as_torch(x, dtype or "")
    codes, scb = kernels_int8.quantize_int8(x.to(device), scale=scale)
    return codes.cpu().numpy(), scb.cpu().numpy()


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
