"""Fused 3-D expert records (Qwen3-VL-MoE) <-> the per-expert records :func:`stack_records` stacks.

A folder converted with ``--moe-experts quantize`` from a checkpoint that stores a layer's experts fused
(converter/plan/moe_fused.py) holds one bnb 4-bit record per tensor, in transformers' model orientation:
``<layer>.mlp.experts.gate_up_proj`` ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]``. bitsandbytes'
blocks run over the flattened tensor, so with ``I*H % blocksize == 0`` expert ``e``'s gate, up and
down are whole runs of blocks: byte for byte the per-expert records ``experts.<e>.gate_proj.weight``...
that a per-expert checkpoint's conversion holds (``../shared/reference/moe-4bit.md``). The nested
absmax runs in 256-wide blocks over the whole tensor with one offset, so a piece keeps its nested
codes only when its ``I*H/blocksize`` blocks are a multiple of 256 (Qwen3-VL-30B-A3B: 24576);
otherwise the piece gets the float32 absmax decoded from the whole record, as the kernels decode it.

Saving (:func:`fused_state_dict`) writes the fused records again under the fused names: the same
bytes when the nested codes were kept, else the codes with the float32 absmax (a valid bnb record).
A kept 16-bit fused tensor in the Hub's orientation is transposed at load (:func:`orient_kept`), as
transformers' ``Transpose(1, 2, check_dims=True)`` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from converter.loader import ops
from converter.loader.module import state_from_record
from converter.loader.moe_records import ROLES, ExpertsLayout, MoeLoadError, span_record
from converter.plan.moe_fused import FUSED_EXPERT_KEY, swap_last
from formats.quant_types import NESTED_BLOCKSIZE
from formats.record import NestedAbsmax, QuantizedTensor

#: The per-expert leaf names the fused records are split under (never written: saving writes fused).
SPLIT_NAMES = ("gate_proj", "up_proj", "down_proj")
FUSED_NAMES = ("gate_up_proj", "down_proj")


def _piece(
    rec: QuantizedTensor, name: str, shape: tuple[int, int], index: int, decoded: torch.Tensor | None
) -> QuantizedTensor:
    """The ``index``-th run of ``shape`` elements of ``rec`` as a record of its own (views, no copy)."""
    numel = math.prod(shape)
    nb = numel // rec.blocksize
    packed = ops.packed_bytes(rec.packed)[index * numel // 2 : (index + 1) * numel // 2]
    nested = None
    if decoded is not None:  # nested blocks straddle the pieces: the float32 absmax decoded once
        absmax = decoded[index * nb : (index + 1) * nb]
    else:
        absmax = rec.absmax.reshape(-1)[index * nb : (index + 1) * nb]
        if rec.nested is not None:
            nn_ = nb // NESTED_BLOCKSIZE
            nabs = rec.nested.nested_absmax.reshape(-1)[index * nn_ : (index + 1) * nn_]
            nested = NestedAbsmax(nabs, rec.nested.nested_quant_map, rec.nested.offset)
    return QuantizedTensor(
        name,
        shape,
        rec.dtype,
        rec.quant_type,
        rec.blocksize,
        packed.reshape(-1, 1),
        absmax,
        rec.quant_map,
        nested,
    )


def _check(rec: QuantizedTensor, key: str, proj: str, where: str) -> None:
    if len(rec.shape) != 3:
        msg = f"{where}: {key!r} is a quantized fused expert tensor of shape {list(rec.shape)}, not 3-D"
        raise MoeLoadError(msg)
    _, out_f, in_f = rec.shape
    if proj == "gate_up_proj" and out_f % 2:
        msg = f"{where}: {key!r} has shape {list(rec.shape)}: gate_up_proj needs an even row count"
        raise MoeLoadError(msg)
    rows = out_f // 2 if proj == "gate_up_proj" else out_f
    if (rows * in_f) % rec.blocksize:
        msg = (
            f"{where}: {key!r} of shape {list(rec.shape)}: one expert's projection does not fill whole "
            f"{rec.blocksize}-element blocks, so the record cannot be sliced per expert"
        )
        raise MoeLoadError(msg)


def split_record(
    rec: QuantizedTensor, key: str, proj: str, prefix: str, where: str, *, sizes_only: bool = False
) -> dict[str, QuantizedTensor]:
    """The per-expert pieces ``<prefix><e>.{gate,up,down}_proj.weight`` of the fused ``proj`` record
    ``rec`` (stored under ``key``); ``sizes_only`` as :func:`split_fused` takes it."""
    _check(rec, key, proj, where)
    num, out_f, in_f = rec.shape
    pieces = ((0, "gate_proj"), (1, "up_proj")) if proj == "gate_up_proj" else ((0, "down_proj"),)
    shape = (out_f // len(pieces), in_f)
    nb = math.prod(shape) // rec.blocksize
    decoded = None
    if rec.nested is not None and nb % NESTED_BLOCKSIZE:  # nested blocks straddle the pieces
        decoded = (
            torch.empty(num * out_f * in_f // rec.blocksize, dtype=torch.float32, device="meta")
            if sizes_only
            else ops.decoded_absmax(state_from_record(rec)).reshape(-1)
        )
    out = {}
    for e in range(num):
        for i, leaf in pieces:
            name = f"{prefix}{e}.{leaf}.weight"
            out[name] = _piece(rec, name, shape, e * len(pieces) + i, decoded)
    return out


def split_fused(state: dict[str, Any], where: str, *, sizes_only: bool = False) -> dict[str, tuple[str, str]]:
    """Replace (in place) every quantized fused expert record of ``state`` by its per-expert pieces under
    ``<module>.<e>.{gate,up,down}_proj.weight``; returns module -> the fused keys it came from.
    ``sizes_only`` (experts stacked on the meta device: estimate, inspect --memory): no absmax is
    decoded, a de-nested piece gets a meta float32 absmax of its size (no weight data read)."""
    fused: dict[str, tuple[str, str]] = {}
    for key in [k for k, v in state.items() if isinstance(v, QuantizedTensor) and FUSED_EXPERT_KEY.match(k)]:
        m = FUSED_EXPERT_KEY.match(key)
        assert m is not None
        module, proj = m["module"], m["proj"]
        if proj not in FUSED_NAMES:
            msg = f"{where}: {key!r}: no loader runs a quantized fused {proj} (gate_up_proj, down_proj only)"
            raise MoeLoadError(msg)
        state.update(split_record(state.pop(key), key, proj, f"{module}.", where, sizes_only=sizes_only))
        gu, dn = fused.get(module, ("", ""))
        fused[module] = (key, dn) if proj == "gate_up_proj" else (gu, key)
    for module, (gu, dn) in fused.items():
        if not gu or not dn:
            msg = f"{where}: {module!r} has a quantized fused {'down_proj' if gu else 'gate_up_proj'} only"
            raise MoeLoadError(msg)
    return fused


def fused_state_dict(module: Any, prefix: str) -> dict[str, torch.Tensor]:
    """The fused records of a QuantExperts4bit loaded from fused records, under ``prefix`` (``...experts.``):
    ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``, on the CPU."""
    lay = ExpertsLayout(module.hidden_dim, module.intermediate_dim, module.blocksize)
    nested = module.nested_buffers()
    out: dict[str, torch.Tensor] = {}
    for leaf, roles in ((FUSED_NAMES[0], ROLES[:2]), (FUSED_NAMES[1], ROLES[2:])):
        first, last = roles[0], roles[-1]
        po, ao, no = lay.offsets(first)
        end_po, end_ao, end_no = lay.offsets(last)
        spans = (
            (po, end_po + lay.numel(last) // 2),
            (ao, end_ao + lay.blocks(last)),
            (no, end_no + lay.nested_blocks(last)),
        )
        shape = (module.num_experts, sum(lay.shape(r)[0] for r in roles), lay.shape(first)[1])
        rec = span_record(module, nested, f"{prefix}{leaf}", shape, slice(None), spans, ROLES.index(first))
        out.update(rec.state_dict())
    return out


def keep_fused_names_on_save(model: nn.Module) -> None:
    """Make ``save_pretrained`` write the fused records under their own names: transformers' reverse of
    its ``Transpose(1, 2)`` load step would take the records' ``.absmax`` / ``.quant_map`` ... keys for
    parts of one weight and fail (``model.get_parameter``: the 4-bit layer has no ``down_proj``). The
    model's conversions are kept without the converters of the fused expert tensors."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightConverter
    except ImportError:  # another transformers: nothing to revert
        return
    mapping = getattr(model, "_weight_conversions", None)
    if mapping is None:  # what revert_weight_conversion would use
        mapping = get_model_conversion_mapping(model, add_legacy=False)
        mapping = [x for x in mapping if not isinstance(x, PrefixChange)]

    def fused(x: Any) -> bool:
        return isinstance(x, WeightConverter) and all(
            str(p).endswith(("experts.gate_up_proj", "experts.down_proj")) for p in x.source_patterns
        )

    model._weight_conversions = [x for x in mapping if not fused(x)]


def orient_kept(
    state: dict[str, Any], module_name: Callable[[str], str | None], modules: Mapping[str, nn.Module]
) -> None:
    """Transpose (in place) the 16-bit fused expert tensors stored in the Hub's orientation ``[E, in, out]``
    into the model's ``[E, out, in]``, as transformers' ``Transpose(1, 2, check_dims=True)`` does (a
    tensor already of the model's shape is taken as is)."""
    for key, value in list(state.items()):
        m = FUSED_EXPERT_KEY.match(key)
        if m is None or not isinstance(value, torch.Tensor) or value.dim() != 3:
            continue
        name = module_name(m["module"])
        target = getattr(modules.get(name), m["proj"], None) if name else None
        if not isinstance(target, torch.Tensor) or tuple(target.shape) == tuple(value.shape):
            continue
        if tuple(target.shape) == swap_last(value.shape):
            state[key] = value.transpose(1, 2).contiguous()
