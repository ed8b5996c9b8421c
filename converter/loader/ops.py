"""Dequantize and GEMV for the loader: the C++/CUDA kernels when present, plain torch otherwise.

A layer prepares its weight's kernel arguments once (:func:`prepare`: flat codes, float32 maps, the
nested record's offset as a Python float, whether the fused GEMV applies) and each call then only
launches (:func:`linear`). Launches go through the ``torch.ops.quantize_model`` custom ops
(``converter.kernels.custom_ops``) while torch.compile traces, and straight to the same implementations in
eager mode (the dispatcher's per-call cost is most of a small layer's time at batch 1).

Every path computes the same bits (design.md, exactness rules): nested absmax decoded as
``map8[c] * nested_absmax`` then ``+ offset`` (two float32 operations, no FMA), weights as
``quant_map[q] * absmax`` in float32 and one round-to-nearest-even cast. The torch path exists for
CUDA tensors when the extension has no CUDA backend, for devices without kernels (MPS, XPU) and
for an install where the C++ extension is missing; it is slower, never different.

A quant state here is anything with bitsandbytes' ``QuantState`` attribute names (``absmax``,
``shape``, ``code``, ``dtype``, ``blocksize``, ``quant_type``, ``offset``, ``state2``, ``nested``):
bnb's own class once bitsandbytes is imported, :class:`converter.loader.module.QuantState4bit`
otherwise. Both are read the same way, so a weight that PEFT re-quantized with bnb still works.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from converter.kernels import prepared
from converter.kernels.checks import GEMV_MAX_WEIGHTS, KERNEL_DTYPE_NAMES
from converter.kernels.isa_env import bf16_matmul_is_native
from converter.loader import dynamo_marks
from formats.quant_types import NESTED_BLOCKSIZE

#: Largest token count the fused GEMV takes (the kernel is written for batch 1..8).
GEMV_MAX_TOKENS = 8


@functools.cache
def _kernels() -> Any | None:
    """converter.kernels.bnb4bit when its extension imports, else None (the torch path is used)."""
    try:
        from converter.kernels import bnb4bit as kernels  # custom_ops registers torch.ops.quantize_model.*
        from converter.kernels import custom_ops

        kernels.available_backends()
        del custom_ops
    except (ImportError, AttributeError, OSError):
        return None
    return kernels


@functools.cache
def _backends() -> dict:
    k = _kernels()
    return k.available_backends() if k is not None else {}


def kernel_backend(device: torch.device) -> Any | None:
    """The kernels module if it has a backend for ``device`` ("cpu" or "cuda"), else None."""
    k = _kernels()
    if k is None or device.type not in _backends():
        return None
    return k


def packed_bytes(packed: torch.Tensor) -> torch.Tensor:
    """The packed codes as a flat uint8 tensor (quant_storage other than uint8 is the same bytes)."""
    flat = packed.contiguous().reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def _offset_value(offset: Any) -> float:
    return float(offset.item() if isinstance(offset, torch.Tensor) else offset)


def decoded_absmax(state: Any) -> torch.Tensor:
    """float32 absmax [nb] of a state: stored as is, or decoded from the nested codes."""
    if not state.nested:
        return state.absmax.float() if state.absmax.dtype != torch.float32 else state.absmax
    state2 = state.state2
    codes = state.absmax.reshape(-1)
    k = kernel_backend(codes.device)
    if k is not None:
        return k.dequantize_nested(
            codes.contiguous(),
            state2.absmax.contiguous(),
            _offset_value(state.offset),
            state2.code.float().contiguous(),
        )
    nb = codes.numel()
    scale = state2.absmax.float().repeat_interleave(NESTED_BLOCKSIZE)[:nb]
    offset = torch.tensor(_offset_value(state.offset), dtype=torch.float32, device=codes.device)
    # Two separate float32 kernels: a product, then a sum (never fused into an FMA).
    return state2.code.float()[codes.long()] * scale + offset


def dequantize(packed: torch.Tensor, state: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight of ``state.shape`` in ``dtype`` (default: the state's own dtype)."""
    return dequantize_prepared(prepare(packed, state), tuple(state.shape), dtype or state.dtype)


def _dequantize_torch(
    data: torch.Tensor,
    absmax: torch.Tensor,
    n: int,
    blocksize: int,
    quant_map: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    # One lookup of both nibbles per byte: first element in the high nibble.
    pairs = torch.stack((quant_map.repeat_interleave(16), quant_map.repeat(16)), dim=1)  # [256, 2]
    values = pairs[data.long()].reshape(-1)[:n]
    scale = absmax.repeat_interleave(blocksize)[:n]
    return (values * scale).to(dtype)


def gemv_ok(x2d: torch.Tensor, in_features: int, state: Any) -> bool:
    """Whether the fused GEMV takes this call: CPU/CUDA kernel present, a kernel dtype (float32, float16,
    bfloat16: float64 takes the dequantize path), 1..8 tokens, whole blocks per row."""
    if x2d.shape[0] < 1 or x2d.shape[0] > GEMV_MAX_TOKENS or in_features % state.blocksize:
        return False
    if x2d.dtype not in KERNEL_DTYPE_NAMES:
        return False
    k = kernel_backend(x2d.device)
    return k is not None and hasattr(k, "gemv_4bit")


def gemv(x2d: torch.Tensor, packed: torch.Tensor, state: Any, out_features: int, in_features: int):
    """y [B, out_features] = x2d @ W.T through the fused kernel (nested absmax decoded inline)."""
    return gemv_prepared(x2d, prepare(packed, state))


# -- prepared weights ------------------------------------------------------------------------------


class KernelArgs(NamedTuple):
    """Everything a launch needs from one weight, computed once (tensors on the weight's device)."""

    packed: torch.Tensor  # uint8 [n // 2], flat
    absmax: torch.Tensor | None  # float32 [nb]; None when nested
    codes: torch.Tensor | None  # uint8 [nb] nested absmax codes
    nested_absmax: torch.Tensor | None  # float32 [ceil(nb / 256)]
    nested_map: torch.Tensor | None  # float32 [256]
    offset: float  # nested offset (0.0 when not nested)
    quant_map: torch.Tensor  # float32 [16]
    out_features: int
    in_features: int
    blocksize: int
    dtype: torch.dtype  # the original weight's dtype (dequantize's default)
    impls: dict | None  # converter.kernels.custom_ops.IMPLS[device type], None: no kernel for this device
    gemv: bool  # the fused GEMV applies (a kernel, whole blocks per row)
    key: int = -1  # converter.kernels.prepared's key once a layer registered these (>= 0), else -1

    @property
    def multi(self) -> bool:
        """This device's kernels have the several-weights launch (gemv_4bit_multi)."""
        return self.impls is not None and "gemv_4bit_multi" in self.impls


def prepare(packed: torch.Tensor, state: Any) -> KernelArgs:
    """The kernel arguments of a weight ([out, in] or any shape when only dequantized)."""
    if packed.device.type == "cpu":
        _bf16_matmul_is_native()  # eager: what a compiled graph of this CPU layer reads (f32_prefill)
    shape = tuple(int(d) for d in state.shape)
    out_features = shape[0] if len(shape) == 2 else 1
    in_features = math.prod(shape) // out_features
    data = packed_bytes(packed)
    impls = None
    if kernel_backend(data.device) is not None:
        from converter.kernels.custom_ops import IMPLS

        impls = IMPLS.get(data.device.type)
    absmax = codes = nested_absmax = nested_map = None
    offset = 0.0
    if state.nested:
        codes = state.absmax.reshape(-1).contiguous()
        nested_absmax = state.state2.absmax.float().contiguous()
        nested_map = state.state2.code.float().contiguous()
        offset = _offset_value(state.offset)
        if impls is None:  # the torch path decodes the absmax once here
            absmax = decoded_absmax(state)
            codes = nested_absmax = nested_map = None
    else:
        absmax = state.absmax.float().contiguous()
    return KernelArgs(
        packed=data,
        absmax=absmax,
        codes=codes,
        nested_absmax=nested_absmax,
        nested_map=nested_map,
        offset=offset,
        quant_map=state.code.float().contiguous(),
        out_features=out_features,
        in_features=in_features,
        blocksize=int(state.blocksize),
        dtype=state.dtype,
        impls=impls,
        gemv=impls is not None and len(shape) == 2 and in_features % int(state.blocksize) == 0,
    )


def _op(args: KernelArgs, name: str) -> Any:
    """The custom op while torch.compile traces (one opaque graph node), else its implementation."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.quantize_model, name)
    return args.impls[name]


def keyed_tracing() -> bool:
    """Whether a launch traced now reads registered tensors by key (converter/kernels/prepared.py): while
    torch.compile traces, but not under ``torch.export``, whose program would keep this process's keys
    as constants (a saved or later-run program would read no or other layers' tensors): there the
    tensors are the graph's inputs, as before the keyed ops."""
    return torch.compiler.is_compiling() and not _exporting()


@dynamo_marks.assume_constant_result
def _exporting() -> bool:
    """Whether ``torch.export`` is tracing, read when dynamo traces the call. Not
    ``torch.compiler.is_exporting()``: dynamo up to torch 2.11 folds that call to True under
    ``torch.compile`` too (torch/_dynamo/variables/torch.py), which sent every compiled call there down
    the general path (no keyed ops: the prepared tensors were graph inputs again, and a graph kept
    reading the old codes after ``weight.data = ...``). torch.export sets the flag it returns."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


def _keyed(args_seq: Sequence[KernelArgs]) -> bool:
    """Whether a traced launch reads these weights' prepared tensors by key: :func:`keyed_tracing` and
    every weight registered."""
    return keyed_tracing() and all(a.key >= 0 for a in args_seq)


def gemv_prepared(x2d: torch.Tensor, args: KernelArgs, weight: torch.Tensor | None = None) -> torch.Tensor:
    """y [B, out_features] = x2d @ W.T through the fused kernel (B = 1..8, nested absmax decoded inline).
    ``weight``: the layer's weight the registered ``args`` were prepared from (compiled graphs read it
    as their one input of the layer; default ``args.packed``)."""
    if _keyed((args,)):
        w = args.packed if weight is None else weight
        return torch.ops.quantize_model.gemv_4bit_keyed(x2d, w, args.key, args.out_features)
    return _op(args, "gemv_4bit")(
        x2d,
        args.packed,
        args.absmax,
        args.codes,
        args.nested_absmax,
        args.nested_map,
        args.offset,
        args.quant_map,
        args.out_features,
        args.blocksize,
    )


class KeyedLaunch(NamedTuple):
    """What a traced launch of a registered weight reads besides x and the weight (:func:`keyed_launch`)."""

    key: int
    in_features: int
    out_features: int
    gemv: bool
    blocksize: int
    multi: bool  # its device's kernels have the several-weights launch (gemv_4bit_multi)


@dynamo_marks.assume_constant_result
def keyed_launch(key: int) -> KeyedLaunch:
    """The launch constants of the weight registered under ``key``, taken by a traced graph as constants.

    Dynamo guards every attribute a traced forward reads: read from the layer's ``_kernel_args`` these
    were five guards per 4-bit layer (its type, length, key, gemv, in/out features) checked before every
    compiled call. A registered entry is never changed and a key is never reused
    (converter/kernels/prepared.py), so they are a function of the key alone: the graph guards the key
    (its layer's ``_prepared_key``, one int guard) and a layer prepared again has a new key, so the graph
    is traced again and this is evaluated anew."""
    a = prepared.lookup(key)
    return KeyedLaunch(a.key, a.in_features, a.out_features, a.gemv, a.blocksize, a.multi)


def keyed_linear(
    x: torch.Tensor, weight: torch.Tensor, launch: KeyedLaunch, bias: torch.Tensor | None
) -> torch.Tensor | None:
    """:func:`linear`'s fused-GEMV branch for a traced call of a registered weight (``launch``: its
    :func:`keyed_launch`), the same op and arguments; None where :func:`linear` would dequantize."""
    tokens = x.numel() // launch.in_features
    if not (launch.gemv and 1 <= tokens <= GEMV_MAX_TOKENS and x.dtype in KERNEL_DTYPE_NAMES):
        return None
    x2d = x.reshape(tokens, launch.in_features)
    y = torch.ops.quantize_model.gemv_4bit_keyed(x2d, weight, launch.key, launch.out_features)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], launch.out_features)


def multi_ok(
    x2d: torch.Tensor,
    args_seq: Sequence[KernelArgs] | Sequence[KeyedLaunch],
    weights: Sequence[torch.Tensor] | None = None,
) -> bool:
    """Whether one several-weights launch (:func:`gemv_prepared_multi`) takes ``x2d`` times these weights:
    2..GEMV_MAX_WEIGHTS weights that each take the fused GEMV, of one in_features and blocksize, on
    x2d's device, with a kernel for it, and 1..GEMV_MAX_TOKENS rows of x2d. ``args_seq``: the weights'
    kernel arguments, or while tracing their :func:`keyed_launch` (then ``weights``, the layers' weights,
    say where they are; default: the arguments' packed codes)."""
    if not 2 <= len(args_seq) <= GEMV_MAX_WEIGHTS or not 1 <= x2d.shape[0] <= GEMV_MAX_TOKENS:
        return False
    if x2d.dtype not in KERNEL_DTYPE_NAMES:
        return False
    a0 = args_seq[0]
    if x2d.dim() != 2 or x2d.shape[1] != a0.in_features:
        return False
    on = [a.packed for a in args_seq] if weights is None else weights
    return all(
        a.gemv and a.multi and a.in_features == a0.in_features and a.blocksize == a0.blocksize
        for a in args_seq
    ) and all(w.device == x2d.device for w in on)


def gemv_prepared_multi(
    x2d: torch.Tensor,
    args_seq: Sequence[KernelArgs] | Sequence[KeyedLaunch],
    weights: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """``[x2d @ W_i.T]`` ([B, out_features_i] each, x2d's dtype) in one launch (:func:`multi_ok` holds):
    each equal to :func:`gemv_prepared` of weight i on CPU; on CUDA within the same derived bound.
    While tracing, ``args_seq`` may be the weights' :func:`keyed_launch` (then ``weights`` are given)."""
    compiling = torch.compiler.is_compiling()
    if _keyed(args_seq):  # graph inputs besides x: the weights
        return torch.ops.quantize_model.gemv_4bit_multi_keyed(
            x2d,
            [a.packed for a in args_seq] if weights is None else list(weights),
            [a.key for a in args_seq],
            [a.out_features for a in args_seq],
            args_seq[0].blocksize,
        )
    fn = torch.ops.quantize_model.gemv_4bit_multi if compiling else args_seq[0].impls["gemv_4bit_multi"]
    return fn(
        x2d,
        [a.packed for a in args_seq],
        [a.absmax for a in args_seq],
        [a.codes for a in args_seq],
        [a.nested_absmax for a in args_seq],
        [a.nested_map for a in args_seq],
        [a.offset for a in args_seq],
        [a.quant_map for a in args_seq],
        [a.out_features for a in args_seq],
        args_seq[0].blocksize,
    )


def check_compute_dtype(dtype: torch.dtype) -> None:
    """A dtype the 4-bit and int8 layers compute in (a TypeError naming them, not a KeyError)."""
    if dtype not in KERNEL_DTYPE_NAMES and dtype != torch.float64:
        msg = f"quantized layers compute in float32, float16, bfloat16 or float64, not {dtype}"
        raise TypeError(msg)


def dequantize_prepared(args: KernelArgs, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The weight of ``shape`` in ``dtype`` (every path the same bits).

    float64 (no kernel dtype): the float32 weight, cast. Each element is the float32 product
    ``quant_map[q] * absmax``, which float64 holds exactly, so this is the float32 weight, unrounded."""
    if dtype not in KERNEL_DTYPE_NAMES:
        check_compute_dtype(dtype)
        return dequantize_prepared(args, shape, torch.float32).to(dtype)
    n = math.prod(shape)
    if args.impls is None:
        flat = _dequantize_torch(args.packed, args.absmax, n, args.blocksize, args.quant_map, dtype)
        return flat.reshape(shape)
    flat = _op(args, "dequantize_4bit")(
        args.packed,
        args.absmax,
        args.codes,
        args.nested_absmax,
        args.nested_map,
        args.offset,
        args.quant_map,
        n,
        args.blocksize,
        dtype,
    )
    return flat.reshape(shape)


def linear(
    x: torch.Tensor,
    args: KernelArgs,
    bias: torch.Tensor | None,
    use_gemv: bool = True,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` in x's dtype (bias already in it): fused GEMV for 1..8 tokens, else an
    exact dequantize + ``F.linear`` (the call bitsandbytes makes). ``weight``: as :func:`gemv_prepared`."""
    tokens = x.numel() // args.in_features
    if use_gemv and args.gemv and 1 <= tokens <= GEMV_MAX_TOKENS and x.dtype in KERNEL_DTYPE_NAMES:
        y = gemv_prepared(x.reshape(tokens, args.in_features), args, weight)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], args.out_features)
    if use_gemv and f32_prefill(x):
        return linear_f32(
            x, dequantize_prepared(args, (args.out_features, args.in_features), torch.float32), bias
        )
    w = dequantize_prepared(args, (args.out_features, args.in_features), x.dtype)
    return torch.nn.functional.linear(x, w, bias)


def linear_f32(x: torch.Tensor, w32: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ w32.T + bias`` for bf16 x on a CPU without native bf16 matmuls (:func:`f32_prefill`):
    torch's bf16 GEMM there is 4-7x slower than float32's. The float32 weight (the f32 products the GEMV
    also multiplies with) and x widened exactly, one float32 GEMM, rounded once to x's dtype."""
    bias32 = bias.float() if bias is not None else None
    return torch.nn.functional.linear(x.float(), w32, bias32).to(x.dtype)


def f32_prefill(x: torch.Tensor) -> bool:
    """A bf16 call under ``torch.no_grad`` (generate, inference) on a CPU without native bf16 matmuls
    (``isa_env.bf16_matmul_is_native``), the same in a compiled graph as in eager mode. With grad enabled
    (training) and with ``use_gemv = False`` the layer keeps bitsandbytes' bf16 call."""
    return (
        x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not _bf16_matmul_is_native()
    )


#: isa_env.bf16_matmul_is_native() as last seen in eager mode (a layer's preparation at load, or a call):
#: a compiled graph reads this global (dynamo guards it) instead of the extension's CPU facts.
_native_bf16_matmul = True


def _bf16_matmul_is_native() -> bool:
    global _native_bf16_matmul
    if not torch.compiler.is_compiling():
        _native_bf16_matmul = bf16_matmul_is_native()
    return _native_bf16_matmul


_warned: set[str] = set()


def warn_if_slow(device: torch.device | str) -> None:
    """Warn once per device type when the 4-bit layers on ``device`` run the slow torch path."""
    device = torch.device(device)
    if device.type in _warned or device.type not in ("cpu", "cuda"):
        return
    k = _kernels()
    if k is None:
        why = (
            "the compiled extension converter._kernels is missing (a source checkout?): the 4-bit layers "
            "fall back to plain torch code, ~10x slower; build it with `pip install --no-build-isolation "
            "-e .` (or `make install`)"
        )
    elif device.type not in _backends():
        why = (
            "this build of quantize-model has no usable CUDA backend"
            + (f" ({k._cuda_module().cuda_status()[1]})" if k._kernels.has_cuda_build() else "")
            + ": the 4-bit layers on the GPU fall back to plain torch code (dequantize + matmul); "
            "reinstall on a machine with nvcc (QM_CUDA=ON pip install .)"
        )
    else:
        return
    _warned.add(device.type)
    warnings.warn(why, RuntimeWarning, stacklevel=3)


def not_a_view(y: torch.Tensor) -> torch.Tensor:
    """A custom autograd Function's output as it may return it: an output that is a view made inside the
    Function cannot be modified in place by the caller (autograd refuses it: Llama 4's MoE adds its
    routed experts into the shared expert's output in place). Only the GEMV paths' reshape makes one:
    its few rows are copied."""
    return y.clone() if y._base is not None else y
