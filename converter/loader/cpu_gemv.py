"""The eager CPU decode launch of a prepared 4-bit weight: the C++ GEMV with no per-call Python checks.

At batch 1 a SmolLM2-sized layer (192..1536 x 576) computes in 3-10 µs, and the general route
(``ops.linear`` -> the custom op's implementation -> ``launch_gemv_4bit_cpu``: shape arithmetic, argument
checks, seven ``data_ptr()`` calls, a dict lookup per call) added ~8 µs to each of its 210 calls per
token (dev VM). Everything that depends on the weight alone is computed once here (the pointers stay
valid: the layer keeps the tensors in its ``KernelArgs``); a call checks only x: on the CPU,
contiguous, a kernel dtype, 1..8 tokens of ``in_features``. Anything else returns None and the caller
takes the general route. Same kernel, same arguments, so the same bits as that route.
"""

from __future__ import annotations

import torch

from converter import _kernels
from converter.kernels.checks import GEMV_MAX_BATCH, KERNEL_DTYPE_NAMES
from converter.kernels.cpu_threads import gemv_threads
from converter.loader.ops import KernelArgs


class CpuGemv:
    """``y = x @ W.T`` for a prepared CPU weight; ``__call__`` returns None when x does not fit."""

    __slots__ = ("_args", "_consts", "_in", "_out", "_packed_bytes")

    def __init__(self, args: KernelArgs) -> None:
        self._args = args  # keeps every tensor whose address is in _consts alive
        nested = args.absmax is None
        self._consts = (
            args.blocksize,
            args.packed.data_ptr(),
            args.quant_map.data_ptr(),
            0 if nested else args.absmax.data_ptr(),
            args.codes.data_ptr() if nested else 0,
            args.nested_absmax.data_ptr() if nested else 0,
            float(args.offset),
            args.nested_map.data_ptr() if nested else 0,
        )
        self._in, self._out = args.in_features, args.out_features
        self._packed_bytes = args.packed.numel()

    def __reduce__(self) -> tuple:
        # deepcopy and pickle rebuild from the (copied) tensors: the addresses are never copied
        return (CpuGemv, (self._args,))

    @staticmethod
    def applies(args: KernelArgs) -> bool:
        """Whether ``args`` is a CPU weight the fused GEMV takes."""
        return args.gemv and args.packed.device.type == "cpu"

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        dtype = KERNEL_DTYPE_NAMES.get(x.dtype)
        tokens = x.numel() // self._in
        if dtype is None or not x.is_cpu or not x.is_contiguous() or not 1 <= tokens <= GEMV_MAX_BATCH:
            return None
        if x.shape[-1] != self._in:
            return None
        y = torch.empty((*x.shape[:-1], self._out), dtype=x.dtype)
        bs, packed, qmap, absmax, codes, nabs, offset, nmap = self._consts
        _kernels.gemv_4bit(
            x.data_ptr(), dtype, tokens, self._in, self._out, bs, packed, qmap, absmax, codes, nabs, offset,
            nmap, y.data_ptr(), "auto", gemv_threads(self._packed_bytes),
        )  # fmt: skip
        return y
