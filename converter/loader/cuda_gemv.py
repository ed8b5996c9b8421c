"""The eager CUDA decode launches of prepared 4-bit weights: the kernel with no per-call Python checks.

In eager ``generate()`` the GPU waits on the host: an 8B Llama decodes a token in ~1.5 ms of GPU time
but ~27 ms of host time in bf16 (H100 host, round 37), and each 4-bit call went through the general
route (``ops.linear`` -> the custom op's implementation -> argument checks -> ``_launch_gemv_4bit``:
~15 Python calls, two device-index lookups, a cached scratch-size lookup) before its one launch; the
q/k/v and gate/up groups (loader/siblings.py) paid that per member plus seven list comprehensions.

Everything that depends on the weights alone is computed once here (the pointers stay valid: the
objects keep the tensors of their ``KernelArgs``); a call checks only x (on the weights' device,
contiguous, a kernel dtype, 1..8 tokens of ``in_features``), allocates the outputs and any scratch
(from the graph's pool under CUDA-graph capture, as the general route does), reads torch's current
stream and launches. Anything else returns None and the caller takes the general route. Same kernels,
same arguments and variant, so the same bits as that route (the CUDA counterpart of loader/cpu_gemv.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch

from converter.kernels.checks import GEMV_MAX_BATCH, GEMV_MAX_WEIGHTS, KERNEL_DTYPE_CODES
from converter.loader.ops import KernelArgs

_raw_stream = torch._C._cuda_getCurrentRawStream if hasattr(torch._C, "_cuda_getCurrentRawStream") else None


def _absmax_pointers(kc: ModuleType, args: KernelArgs) -> tuple[int, int, int, float, int]:
    """(absmax, codes, nested_absmax, offset, nested_map) as the CUDA launch takes them."""
    nested = None
    if args.absmax is None:
        nested = (args.codes, args.nested_absmax, args.offset, args.nested_map)
    return kc._absmax_args(args.absmax, nested)


def _fits(x: torch.Tensor, device: torch.device, in_features: int) -> tuple[int, int] | None:
    """(dtype code, tokens) of an x the launch takes as it is, else None."""
    dtype = KERNEL_DTYPE_CODES.get(x.dtype)
    tokens = x.numel() // in_features
    if dtype is None or x.device != device or not x.is_contiguous() or not 1 <= tokens <= GEMV_MAX_BATCH:
        return None
    return (dtype, tokens) if x.shape[-1] == in_features else None


def _applies(args: KernelArgs) -> bool:
    return (
        _raw_stream is not None
        and args.gemv
        and args.impls is not None
        and args.packed.device.type == "cuda"
        and "gemv_4bit" in args.impls
    )


class CudaGemv:
    """``y = x @ W.T`` for one prepared CUDA weight; ``__call__`` returns None when x does not fit."""

    __slots__ = ("_args", "_consts", "_dev", "_device", "_in", "_kc", "_out", "_scratch")

    def __init__(self, args: KernelArgs) -> None:
        from converter.kernels import bnb4bit_cuda  # imported with the first CUDA weight only

        self._kc = bnb4bit_cuda
        self._args = args  # keeps every tensor whose address is in _consts alive
        self._device = args.packed.device
        self._dev = self._device.index
        pointers = _absmax_pointers(bnb4bit_cuda, args)
        self._consts = (args.blocksize, args.packed.data_ptr(), *pointers, args.quant_map.data_ptr())
        self._in, self._out = args.in_features, args.out_features
        self._scratch: dict[tuple[int, int], int] = {}  # (dtype code, tokens) -> float32 elements

    def __reduce__(self) -> tuple:
        # deepcopy and pickle rebuild from the (copied) tensors: the addresses are never copied
        return (CudaGemv, (self._args,))

    @staticmethod
    def applies(args: KernelArgs) -> bool:
        """Whether ``args`` is a CUDA weight the fused GEMV takes (with the extension's CUDA backend)."""
        return _applies(args)

    def _scratch_elements(self, dtype: int, tokens: int) -> int:
        kc = self._kc
        variant = kc.GEMV_DEFAULT_VARIANT
        n = kc._gemv_scratch(self._dev, dtype, tokens, self._out, self._in, self._consts[0], variant)
        self._scratch[dtype, tokens] = n
        return n

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        if (fit := _fits(x, self._device, self._in)) is None:
            return None
        dtype, tokens = fit
        y = torch.empty((*x.shape[:-1], self._out), dtype=x.dtype, device=self._device)
        n = self._scratch.get(fit)
        if n is None:
            n = self._scratch_elements(dtype, tokens)
        # K-slice partial sums of the stream kernel (thin shapes); inside a graph, from its memory pool
        scratch = torch.empty(n, dtype=torch.float32, device=self._device) if n else None
        bs, packed, am, nc, na, off, m8, qmap = self._consts
        dev, kc = self._dev, self._kc
        kc._kernels.cuda_gemv_4bit(
            dev, x.data_ptr(), dtype, tokens, self._out, self._in, bs, packed, am, nc, na, off, m8, qmap,
            y.data_ptr(), _raw_stream(dev), kc.GEMV_DEFAULT_VARIANT,
            0 if scratch is None else scratch.data_ptr(),
        )  # fmt: skip
        return y


class CudaGemvGroup:
    """``[x @ W_i.T]`` for 2..4 prepared CUDA weights of one in_features and blocksize in one launch
    (``gemv_4bit_multi``): the eager launch of a sibling group (loader/siblings.py)."""

    __slots__ = ("_consts", "_dev", "_device", "_in", "_kc", "_outs", "_rows", "_scratch", "args")

    def __init__(self, args: Sequence[KernelArgs]) -> None:
        from converter.kernels import bnb4bit_cuda

        self._kc = bnb4bit_cuda
        self.args = tuple(args)  # the members' arguments it was made from (and keeps alive)
        first = self.args[0]
        self._device = first.packed.device
        self._dev = self._device.index
        self._in = first.in_features
        self._outs = [a.out_features for a in self.args]
        self._rows = sum(self._outs)
        ptrs = [_absmax_pointers(bnb4bit_cuda, a) for a in self.args]
        self._consts = (
            first.blocksize,
            self._outs,
            [a.packed.data_ptr() for a in self.args],
            *([p[i] for p in ptrs] for i in range(5)),
            [a.quant_map.data_ptr() for a in self.args],
        )
        self._scratch: dict[tuple[int, int], int] = {}

    def __reduce__(self) -> tuple:
        return (CudaGemvGroup, (self.args,))

    @staticmethod
    def applies(args: Sequence[KernelArgs]) -> bool:
        """Whether one several-weights launch takes these weights (``ops.multi_ok``'s weight conditions)."""
        if not 2 <= len(args) <= GEMV_MAX_WEIGHTS or not all(_applies(a) and a.multi for a in args):
            return False
        a0 = args[0]
        same = (a0.in_features, a0.blocksize, a0.packed.device)
        return all((a.in_features, a.blocksize, a.packed.device) == same for a in args)

    def fits(self, x: torch.Tensor) -> tuple[int, int] | None:
        """(dtype code, tokens) when the launch takes x as it is (1..8 tokens of in_features, contiguous, a
        kernel dtype, on the weights' device), else None (the general route)."""
        return _fits(x, self._device, self._in)

    def __call__(self, x: torch.Tensor, fit: tuple[int, int]) -> list[torch.Tensor]:
        """[tokens, out_i] outputs for an x that :meth:`fits` (``fit``: its answer)."""
        dtype, tokens = fit
        kc = self._kc
        n = self._scratch.get(fit)
        if n is None:
            bs, variant = self._consts[0], kc.GEMV_DEFAULT_VARIANT
            n = kc._gemv_multi_scratch(self._dev, dtype, tokens, self._rows, self._in, bs, variant)
            self._scratch[fit] = n
        device = self._device
        ys = [torch.empty((tokens, o), dtype=x.dtype, device=device) for o in self._outs]
        scratch = torch.empty(n, dtype=torch.float32, device=device) if n else None
        bs, outs, packed, am, nc, na, off, m8, qmaps = self._consts
        kc._kernels.cuda_gemv_4bit_multi(
            self._dev, x.data_ptr(), dtype, tokens, self._in, bs, outs, packed, am, nc, na, off, m8, qmaps,
            [y.data_ptr() for y in ys], _raw_stream(self._dev), kc.GEMV_DEFAULT_VARIANT,
            0 if scratch is None else scratch.data_ptr(),
        )  # fmt: skip
        return ys
