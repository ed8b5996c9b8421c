"""The 4-bit kernels as torch custom ops (``torch.ops.quantize_model.*``), for torch.compile and CUDA graphs.

A pybind call is opaque to dynamo (a graph break); a ``torch.library`` custom op is one node of the
graph, with a fake implementation that gives the output's shape and dtype without running anything.
So a model whose layers call these ops compiles with ``fullgraph=True`` and can be captured in a CUDA
graph (``mode="reduce-overhead"``):

- the CPU kernel is the C++ extension, the CUDA kernel ``converter.kernels.bnb4bit_cuda``'s launch, both run
  only outside tracing (so ``torch.cuda`` stream objects and data pointers are fine there);
- CUDA launches go to the current stream, allocate their output on x's device (inside a graph's
  memory pool while capturing) and never synchronise with the host;
- arguments are the tensors and plain numbers of one weight, prepared once by the caller and checked
  there (``converter.kernels.checks``); an op checks only what changes per call (x).

Ops (schemas inferred from the type hints below):

- ``gemv_4bit(x [B, K], packed, absmax?, codes?, nested_absmax?, nested_map?, offset, quant_map,
  out_features, blocksize) -> y [B, out_features]`` (x's dtype; B = 1..8, K a multiple of blocksize)
- ``dequantize_4bit(packed, absmax?, codes?, nested_absmax?, nested_map?, offset, quant_map, n,
  blocksize, dtype) -> w [n]``
- ``dequantize_nested(codes, nested_absmax, nested_map, offset) -> absmax float32 [nb]``
- ``gemv_4bit_keyed(x, weight, key, out_features)`` / ``gemv_4bit_multi_keyed(x, weight[], key[],
  out_features[], blocksize)``: the same launches, ``weight`` the layer's 4-bit weight as stored and its
  prepared tensors registered under ``key`` (``converter.kernels.prepared``: one graph input and one
  tensor guard per layer in a compiled step, as a bf16 linear has)
- ``gemv_4bit_multi(x [B, K], packed[], absmax?[], codes?[], nested_absmax?[], nested_map?[], offset[],
  quant_map[], out_features[], blocksize) -> [y_i [B, out_features_i]]``: 1..4 weights of the same K
  (q/k/v, gate/up) in one launch; each y_i equals ``gemv_4bit`` of weight i (CPU: bit for bit)

The absmax is either ``absmax`` (float32) or the nested record ``codes`` / ``nested_absmax`` /
``nested_map`` / ``offset`` (then ``absmax`` is None).

Adding an op for another kernel: write its CPU implementation with type hints and a fake one, and call
:func:`define` (optionally with a CUDA implementation); call it through ``torch.ops.quantize_model``.
"""

# No ``from __future__ import annotations``: torch.library reads the real type hints for the schema.

from collections.abc import Callable
from typing import Any

import torch

from converter import _kernels
from converter.kernels import prepared
from converter.kernels.checks import (
    GEMV_MAX_BATCH,
    GEMV_MAX_WEIGHTS,
    KERNEL_DTYPE_NAMES,
    NestedAbsmax,
)
from converter.kernels.cpu_threads import gemv_threads
from converter.kernels.lean_dispatch import register_lean_cpu

#: The torch.library namespace of every op of this project.
NAMESPACE = "quantize_model"


def define(name: str, cpu: Callable, fake: Callable, cuda: Callable | None = None) -> Any:
    """Register ``quantize_model::<name>``: schema from ``cpu``'s type hints, kernels per device, fake impl.

    Returns the op (callable; the same as ``getattr(torch.ops.quantize_model, name)``).
    """
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", cpu, mutates_args=(), device_types="cpu")
    if cuda is not None:
        op.register_kernel("cuda")(cuda)
    op.register_fake(fake)
    register_lean_cpu(op, cpu)  # plain CPU calls skip custom_op's Python autograd layer
    return op


def _cuda() -> Any:
    from converter.kernels import bnb4bit_cuda as kernels_cuda  # imported only when a CUDA tensor arrives

    return kernels_cuda


def _nested(
    codes: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_map: torch.Tensor | None,
    offset: float,
) -> NestedAbsmax | None:
    return None if codes is None else NestedAbsmax(codes, nested_absmax, offset, nested_map)


def _check_x(x: torch.Tensor, packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """x is the one per-call argument: [B, K] with B = 1..GEMV_MAX_BATCH, a float dtype, on the weight's
    device; returned contiguous."""
    if x.device != packed.device:
        msg = f"x is on {x.device} but the 4-bit weight is on {packed.device}: move them to one device"
        raise ValueError(msg)
    if x.dim() != 2 or not 1 <= x.shape[0] <= GEMV_MAX_BATCH or x.shape[1] != in_features:
        msg = f"x has shape {tuple(x.shape)}: the fused GEMV takes [1..{GEMV_MAX_BATCH}, {in_features}]"
        raise ValueError(msg)
    if x.dtype not in KERNEL_DTYPE_NAMES:
        msg = f"x has dtype {x.dtype}: expected float32, float16 or bfloat16"
        raise ValueError(msg)
    return x.contiguous()


# -- dequantize_nested ---------------------------------------------------------------------------------


def _dequantize_nested_cpu(
    codes: torch.Tensor, nested_absmax: torch.Tensor, nested_map: torch.Tensor, offset: float
) -> torch.Tensor:
    out = torch.empty(codes.numel(), dtype=torch.float32)
    _kernels.dequantize_nested(
        codes.data_ptr(),
        codes.numel(),
        nested_absmax.data_ptr(),
        float(offset),
        nested_map.data_ptr(),
        out.data_ptr(),
        0,
    )
    return out


def _dequantize_nested_cuda(
    codes: torch.Tensor, nested_absmax: torch.Tensor, nested_map: torch.Tensor, offset: float
) -> torch.Tensor:
    return _cuda()._launch_dequantize_nested(codes, nested_absmax, offset, nested_map)


def _dequantize_nested_fake(
    codes: torch.Tensor, nested_absmax: torch.Tensor, nested_map: torch.Tensor, offset: float
) -> torch.Tensor:
    return codes.new_empty((codes.numel(),), dtype=torch.float32)


dequantize_nested = define(
    "dequantize_nested", _dequantize_nested_cpu, _dequantize_nested_fake, _dequantize_nested_cuda
)


# -- dequantize_4bit -----------------------------------------------------------------------------------


def _dequantize_4bit_cpu(
    packed: torch.Tensor,
    absmax: torch.Tensor | None,
    codes: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_map: torch.Tensor | None,
    offset: float,
    quant_map: torch.Tensor,
    n: int,
    blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    if absmax is None:  # the CPU kernel takes a float32 absmax: decode the nested one first
        absmax = _dequantize_nested_cpu(codes, nested_absmax, nested_map, offset)
    out = torch.empty(n, dtype=dtype)
    _kernels.dequantize_4bit(
        packed.data_ptr(),
        absmax.data_ptr(),
        n,
        blocksize,
        quant_map.data_ptr(),
        out.data_ptr(),
        KERNEL_DTYPE_NAMES[dtype],
        "auto",
        0,
    )
    return out


def _dequantize_4bit_cuda(
    packed: torch.Tensor,
    absmax: torch.Tensor | None,
    codes: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_map: torch.Tensor | None,
    offset: float,
    quant_map: torch.Tensor,
    n: int,
    blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    nested = _nested(codes, nested_absmax, nested_map, offset)
    return _cuda()._launch_dequantize_4bit(packed, absmax, n, blocksize, quant_map, dtype, None, nested)


def _dequantize_4bit_fake(
    packed: torch.Tensor,
    absmax: torch.Tensor | None,
    codes: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_map: torch.Tensor | None,
    offset: float,
    quant_map: torch.Tensor,
    n: int,
    blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    return packed.new_empty((n,), dtype=dtype)


dequantize_4bit = define(
    "dequantize_4bit", _dequantize_4bit_cpu, _dequantize_4bit_fake, _dequantize_4bit_cuda
)


# -- gemv_4bit -------------------------------------------------------------------------------------------


def _gemv_4bit_cpu(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor | None,
    codes: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_map: torch.Tensor | None,
    offset: float,
    quant_map: torch.Tensor,
    out_features: int,
    blocksize: int,
) -> torch.Tensor:
    # Compiled CPU decode calls this ~200 times per token: the checks of _check_x in one expression,
    # _check_x itself only to raise its message, and the kernel called without launch_gemv_4bit_cpu's
    # argument packing (same arguments, so the same bits).
    in_features = packed.numel() * 2 // out_features
    dtype = KERNEL_DTYPE_NAMES.get(x.dtype)
    if (
        dtype is None
        or not x.is_cpu
        or x.dim() != 2
        or not 1 <= x.shape[0] <= GEMV_MAX_BATCH
        or x.shape[1] != in_features
    ):
        _check_x(x, packed, in_features)
    x = x.contiguous()
    y = torch.empty((x.shape[0], out_features), dtype=x.dtype)
    nested = codes is not None
    _kernels.gemv_4bit(
        x.data_ptr(), dtype, x.shape[0], in_features, out_features, blocksize, packed.data_ptr(),
        quant_map.data_ptr(), 0 if absmax is None else absmax.data_ptr(), codes.data_ptr() if nested else 0,
        nested_absmax.data_ptr() if nested else 0, float(offset) if nested else 0.0,
        nested_map.data_ptr() if nested else 0, y.data_ptr(), "auto", gemv_threads(packed.numel()),
    )  # fmt: skip
    return y


def _gemv_4bit_cuda(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor | None,
    codes: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_map: torch.Tensor | None,
    offset: float,
    quant_map: torch.Tensor,
    out_features: int,
    blocksize: int,
) -> torch.Tensor:
    in_features = packed.numel() * 2 // out_features
    x = _check_x(x, packed, in_features)
    nested = _nested(codes, nested_absmax, nested_map, offset)
    return _cuda()._launch_gemv_4bit(
        x, packed, absmax, out_features, in_features, blocksize, quant_map, nested
    )


def _gemv_4bit_fake(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor | None,
    codes: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_map: torch.Tensor | None,
    offset: float,
    quant_map: torch.Tensor,
    out_features: int,
    blocksize: int,
) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features))


gemv_4bit = define("gemv_4bit", _gemv_4bit_cpu, _gemv_4bit_fake, _gemv_4bit_cuda)


# -- gemv_4bit_keyed: the same launch, the weight's prepared tensors by key (converter.kernels.prepared) ---
# ``weight`` is the layer's 4-bit weight as stored (any shape or quant_storage): a graph input, so the
# compiler sees what the launch reads; the launch reads the registered flat codes of the same bytes.


def _unkey(weight: torch.Tensor, key: int, out_features: int) -> tuple:
    """gemv_4bit's arguments after x: the codes of ``weight``, the rest from the registry.

    The registered codes are the weight's own bytes, except where the call was given other memory: a
    copy of them (torch's ``cudagraphs`` backend copies every non-static input into its recorded
    buffers) or codes put in place with ``weight.data = ...`` (an eager call prepares those again with
    the weight's quant state, which is the registered absmax). Either way the launch reads the codes it
    was given, as the eager forward does."""
    a = prepared.lookup(key)
    packed = a.packed
    if packed.data_ptr() != weight.data_ptr():
        flat = weight.contiguous().reshape(-1)
        packed = flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)
        if packed.numel() != a.packed.numel() or packed.device != a.packed.device:
            msg = (
                f"gemv_4bit_keyed: key {key} was registered for a weight of {a.packed.numel()} code bytes on "
                f"{a.packed.device}, called with {packed.numel()} on {packed.device} (the layer's weight "
                "replaced in place by one of another size); give a layer new weights with load_state_dict"
            )
            raise ValueError(msg)
    return (packed, a.absmax, a.codes, a.nested_absmax, a.nested_map, a.offset, a.quant_map, out_features,
            a.blocksize)  # fmt: skip


def _gemv_4bit_keyed_cpu(x: torch.Tensor, weight: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    return _gemv_4bit_cpu(x, *_unkey(weight, key, out_features))


def _gemv_4bit_keyed_cuda(x: torch.Tensor, weight: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    return _gemv_4bit_cuda(x, *_unkey(weight, key, out_features))


def _gemv_4bit_keyed_fake(x: torch.Tensor, weight: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features))


gemv_4bit_keyed = define(
    "gemv_4bit_keyed", _gemv_4bit_keyed_cpu, _gemv_4bit_keyed_fake, _gemv_4bit_keyed_cuda
)

# -- gemv_4bit_multi -------------------------------------------------------------------------------------


def _check_multi(packed: list[torch.Tensor], out_features: list[int], **lists: list) -> int:
    """The weights' in_features (weight 0's), after checking that every list has one entry per weight
    and every weight has that in_features and lives on one device."""
    n = len(packed)
    if not 1 <= n <= GEMV_MAX_WEIGHTS:
        msg = f"gemv_4bit_multi takes 1..{GEMV_MAX_WEIGHTS} weights, got {n}"
        raise ValueError(msg)
    for name, values in {"out_features": out_features, **lists}.items():
        if len(values) != n:
            msg = f"gemv_4bit_multi: {name} has {len(values)} entries for {n} weights"
            raise ValueError(msg)
    in_features = packed[0].numel() * 2 // max(1, out_features[0])
    for i, (p, o) in enumerate(zip(packed, out_features, strict=True)):
        if o < 1 or p.numel() * 2 != o * in_features:
            msg = (
                f"gemv_4bit_multi: weight {i} has {p.numel() * 2} 4-bit codes for {o} rows, not "
                f"{o} x {in_features} (weight 0's in_features): the weights of one call share in_features"
            )
            raise ValueError(msg)
        if p.device != packed[0].device:
            msg = f"gemv_4bit_multi: weight {i} is on {p.device}, weight 0 on {packed[0].device}"
            raise ValueError(msg)
    return in_features


def _multi_inputs(
    x: torch.Tensor,
    packed: list[torch.Tensor],
    absmax: list,
    codes: list,
    nested_absmax: list,
    nested_map: list,
    offset: list[float],
    quant_map: list[torch.Tensor],
    out_features: list[int],
) -> tuple[torch.Tensor, int]:
    """(x checked for the weights, their in_features): the checks every device's implementation makes."""
    k = _check_multi(
        packed,
        out_features,
        absmax=absmax,
        codes=codes,
        nested_absmax=nested_absmax,
        nested_map=nested_map,
        offset=offset,
        quant_map=quant_map,
    )
    return _check_x(x, packed[0], k), k


def _gemv_4bit_multi_cpu(
    x: torch.Tensor,
    packed: list[torch.Tensor],
    absmax: list[torch.Tensor | None],
    codes: list[torch.Tensor | None],
    nested_absmax: list[torch.Tensor | None],
    nested_map: list[torch.Tensor | None],
    offset: list[float],
    quant_map: list[torch.Tensor],
    out_features: list[int],
    blocksize: int,
) -> list[torch.Tensor]:
    x, k = _multi_inputs(x, packed, absmax, codes, nested_absmax, nested_map, offset, quant_map, out_features)
    ys = [torch.empty((x.shape[0], o), dtype=x.dtype) for o in out_features]
    _kernels.gemv_4bit_multi(
        x.data_ptr(),
        KERNEL_DTYPE_NAMES[x.dtype],
        x.shape[0],
        k,
        blocksize,
        list(out_features),
        [p.data_ptr() for p in packed],
        [q.data_ptr() for q in quant_map],
        [0 if a is None else a.data_ptr() for a in absmax],
        [0 if c is None else c.data_ptr() for c in codes],
        [0 if a is None else a.data_ptr() for a in nested_absmax],
        [float(o) for o in offset],
        [0 if m is None else m.data_ptr() for m in nested_map],
        [y.data_ptr() for y in ys],
        "auto",
        gemv_threads(sum(p.numel() for p in packed)),
    )
    return ys


def _gemv_4bit_multi_cuda(
    x: torch.Tensor,
    packed: list[torch.Tensor],
    absmax: list[torch.Tensor | None],
    codes: list[torch.Tensor | None],
    nested_absmax: list[torch.Tensor | None],
    nested_map: list[torch.Tensor | None],
    offset: list[float],
    quant_map: list[torch.Tensor],
    out_features: list[int],
    blocksize: int,
) -> list[torch.Tensor]:
    x, k = _multi_inputs(x, packed, absmax, codes, nested_absmax, nested_map, offset, quant_map, out_features)
    kc = _cuda()
    weights = [
        kc.GemvWeight(
            packed[i],
            absmax[i],
            _nested(codes[i], nested_absmax[i], nested_map[i], offset[i]),
            quant_map[i],
            out_features[i],
        )
        for i in range(len(packed))
    ]
    return kc._launch_gemv_4bit_multi(x, weights, k, blocksize)


def _gemv_4bit_multi_fake(
    x: torch.Tensor,
    packed: list[torch.Tensor],
    absmax: list[torch.Tensor | None],
    codes: list[torch.Tensor | None],
    nested_absmax: list[torch.Tensor | None],
    nested_map: list[torch.Tensor | None],
    offset: list[float],
    quant_map: list[torch.Tensor],
    out_features: list[int],
    blocksize: int,
) -> list[torch.Tensor]:
    return [x.new_empty((x.shape[0], o)) for o in out_features]


gemv_4bit_multi = define(
    "gemv_4bit_multi", _gemv_4bit_multi_cpu, _gemv_4bit_multi_fake, _gemv_4bit_multi_cuda
)


def _unkey_multi(weights: list[torch.Tensor], keys: list[int]) -> tuple:
    """gemv_4bit_multi's per-weight lists after x and before ``out_features``, by key."""
    args = [_unkey(w, k, 0) for w, k in zip(weights, keys, strict=True)]
    return tuple([a[i] for a in args] for i in range(7))


def _gemv_4bit_multi_keyed_cpu(
    x: torch.Tensor, weights: list[torch.Tensor], keys: list[int], out_features: list[int], blocksize: int
) -> list[torch.Tensor]:
    return _gemv_4bit_multi_cpu(x, *_unkey_multi(weights, keys), out_features, blocksize)


def _gemv_4bit_multi_keyed_cuda(
    x: torch.Tensor, weights: list[torch.Tensor], keys: list[int], out_features: list[int], blocksize: int
) -> list[torch.Tensor]:
    return _gemv_4bit_multi_cuda(x, *_unkey_multi(weights, keys), out_features, blocksize)


def _gemv_4bit_multi_keyed_fake(
    x: torch.Tensor, weights: list[torch.Tensor], keys: list[int], out_features: list[int], blocksize: int
) -> list[torch.Tensor]:
    return [x.new_empty((x.shape[0], o)) for o in out_features]


gemv_4bit_multi_keyed = define(
    "gemv_4bit_multi_keyed",
    _gemv_4bit_multi_keyed_cpu,
    _gemv_4bit_multi_keyed_fake,
    _gemv_4bit_multi_keyed_cuda,
)

#: The real implementations by device type, for eager callers that skip the dispatcher (see
#: converter.loader.ops: the same functions the ops run, without the per-call dispatch cost).
IMPLS: dict[str, dict[str, Callable]] = {
    "cpu": {
        "gemv_4bit": _gemv_4bit_cpu,
        "gemv_4bit_multi": _gemv_4bit_multi_cpu,
        "dequantize_4bit": _dequantize_4bit_cpu,
        "dequantize_nested": _dequantize_nested_cpu,
    },
    "cuda": {
        "gemv_4bit": _gemv_4bit_cuda,
        "gemv_4bit_multi": _gemv_4bit_multi_cuda,
        "dequantize_4bit": _dequantize_4bit_cuda,
        "dequantize_nested": _dequantize_nested_cuda,
    },
}
