"""Per-expert bnb records <-> one layer buffer, for :class:`converter.loader.moe.QuantExperts4bit`.

Loading (:func:`stack_records`): the per-expert records of a layer go into ``packed [E, gate + up +
down bytes]`` and ``absmax [E, gate + up + down blocks]`` float32 (nested absmax decoded as the
kernels decode it), allocated on the target device, so each piece is copied once, from the shard
mapping straight to the device. A nested record's nested codes, nested absmax and offset are kept
too, on the host (about 1/32 of the codes' bytes): they are what the converter wrote, and saving
needs them.

Saving (:func:`expert_state_dict`): ``save_pretrained`` / ``state_dict`` of a model with 4-bit
experts writes one bnb record per expert per projection under the checkpoint's names
(``experts.<e>.gate_proj.weight`` + ``.absmax`` / ``.quant_map`` / ``.nested_*`` /
``.quant_state.bitsandbytes__nf4``), the same tensors as the folder it was loaded from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from converter.errors import InputError
from converter.loader import ops
from converter.loader.module import state_from_record
from formats.quant_types import NESTED_BLOCKSIZE, QuantType
from formats.record import NestedAbsmax, QuantizedTensor

ROLES = ("gate", "up", "down")


class MoeLoadError(InputError):
    """A folder's expert tensors do not fit the model's experts modules."""


#: A projection of an expert in a layer's buffers: (role, out_features, in_features).
Projection = tuple[str, int, int]


@dataclass
class ExpertsLayout:
    """Where each projection of an expert sits in the layer's buffers (offsets within one expert's row).

    ``projs``: the projections in buffer order as (role, out, in); default the SwiGLU experts' ``gate
    [I, H]``, ``up [I, H]``, ``down [H, I]`` (:data:`ROLES`). gpt-oss: one fused ``gate_up_projs [2I,
    H]`` then ``down_projs [H, I]`` (converter/loader/moe_gpt_oss.py)."""

    hidden: int
    inter: int
    blocksize: int
    projs: tuple[Projection, ...] | None = None

    def __post_init__(self) -> None:
        if self.projs is None:
            h, i = self.hidden, self.inter
            self.projs = (("gate", i, h), ("up", i, h), ("down", h, i))
        self._by_role = {role: (out, inn) for role, out, inn in self.projs}

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(role for role, _, _ in self.projs)

    def shape(self, role: str) -> tuple[int, int]:
        return self._by_role[role]

    def numel(self, role: str) -> int:
        out, inn = self._by_role[role]
        return out * inn

    def blocks(self, role: str) -> int:
        return self.numel(role) // self.blocksize

    def nested_blocks(self, role: str) -> int:
        return -(-self.blocks(role) // NESTED_BLOCKSIZE)

    def offsets(self, role: str) -> tuple[int, int, int]:
        """(byte offset, block offset, nested-absmax offset) of ``role`` in an expert's rows."""
        roles = self.roles
        before = roles[: roles.index(role)]
        return (
            sum(self.numel(r) // 2 for r in before),
            sum(self.blocks(r) for r in before),
            sum(self.nested_blocks(r) for r in before),
        )

    def spans(self, role: str) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(packed bytes, absmax blocks, nested blocks) ranges of ``role`` in an expert's rows
        (:func:`span_record`'s ``spans``)."""
        po, ao, no = self.offsets(role)
        return (
            (po, po + self.numel(role) // 2),
            (ao, ao + self.blocks(role)),
            (no, no + self.nested_blocks(role)),
        )

    def totals(self) -> tuple[int, int, int]:
        roles = self.roles
        return (
            sum(self.numel(r) // 2 for r in roles),
            sum(self.blocks(r) for r in roles),
            sum(self.nested_blocks(r) for r in roles),
        )


def region_pointers(
    packed: torch.Tensor, absmax: torch.Tensor, byte_offset: int, block_offset: int
) -> tuple[int, int, int, int]:
    """The grouped kernels' view of one projection in every expert's row (``offsets``): codes pointer
    ``byte_offset`` bytes into row 0, codes row stride, absmax (float32) pointer ``block_offset`` blocks
    into row 0, absmax row stride."""
    return (
        packed.data_ptr() + byte_offset,
        packed.stride(0),
        absmax.data_ptr() + 4 * block_offset,
        absmax.stride(0),
    )


@dataclass
class StackedExperts:
    packed: torch.Tensor  # uint8 [E, bytes]
    absmax: torch.Tensor  # float32 [E, blocks]
    quant_map: torch.Tensor  # float32 [16]
    blocksize: int
    quant_type: QuantType
    dtype: str
    # checkpoint leaf of gate, up, down ("gate_proj"... or "w1", "w3", "w2"); a layout's own roles otherwise
    proj_names: tuple[str, ...]
    nested: (
        dict[str, torch.Tensor] | None
    )  # codes [E, blocks] u8, absmax [E, nested] f32, offset [E, projections], map [256]


def _check_record(rec: Any, key: str, role: str, first: Any, first_key: str, lay: ExpertsLayout, where: str,
                  name: str) -> None:  # fmt: skip
    if not isinstance(rec, QuantizedTensor):
        msg = (
            f"{where}: {key!r} is not quantized but other experts of {name!r} are (a --skip or "
            "--include glob split the layer's experts); convert again keeping or quantizing whole "
            "layers' experts"
        )
        raise MoeLoadError(msg)
    if tuple(rec.shape) != lay.shape(role):
        msg = f"{where}: {key!r} has shape {list(rec.shape)}, the model wants {list(lay.shape(role))}"
        raise MoeLoadError(msg)
    same_map = _same(rec.quant_map, first.quant_map)
    if rec.blocksize != first.blocksize or rec.quant_type != first.quant_type or not same_map:
        msg = f"{where}: {key!r} is quantized differently from {first_key!r} (type, blocksize or map)"
        raise MoeLoadError(msg)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or torch.equal(a.float(), b.float())


def _all_nested_alike(experts: dict[int, dict[str, tuple[str, Any]]], nested_map: torch.Tensor) -> bool:
    for parts in experts.values():
        for _, rec in parts.values():
            n = rec.nested
            if n is None or not (
                n.nested_quant_map is nested_map or torch.equal(n.nested_quant_map, nested_map)
            ):
                return False
    return True


def stack_records(
    experts: dict[int, dict[str, tuple[str, Any]]],
    where: str,
    name: str,
    hidden: int,
    inter: int,
    device: torch.device,
    projs: tuple[Projection, ...] | None = None,
) -> StackedExperts:
    """The layer's buffers on ``device`` from its per-expert records (checked against the model's shapes).

    ``experts[e][role] = (key, record)``; ``projs``: the layout's projections (:class:`ExpertsLayout`;
    default gate, up, down, whose checkpoint leaf names become ``proj_names``; a custom layout's
    ``proj_names`` are its roles).

    The layer is assembled where the records are (the CPU mapping, or the GPU a streamed load put them
    on) and moved once if ``device`` differs (``"meta"``: empty tensors of the stacked shapes, nothing
    read, for sizing a placement); the nested absmax of every expert is decoded in one
    vectorised pass per projection, with the same float32 product-then-sum as
    :func:`ops.decoded_absmax` (a pass per record was 18 k small device round trips in a
    Qwen3-30B-A3B).
    """
    roles = ROLES if projs is None else tuple(role for role, _, _ in projs)
    # the reference record is the first 4-bit one: expert 0 may be the one a --skip kept 16-bit, which
    # _check_record below then names (reading its quant state was an AttributeError)
    records = [experts[e][role] for e in sorted(experts) for role in roles]
    first_key, first = next(((k, r) for k, r in records if isinstance(r, QuantizedTensor)), records[0])
    bs, qt, dtype = first.blocksize, first.quant_type, first.dtype
    if (inter * hidden) % bs:
        msg = f"{where}: {name}: {inter}x{hidden} expert weights do not fill whole {bs}-element blocks"
        raise MoeLoadError(msg)
    lay = ExpertsLayout(hidden, inter, bs, projs)
    n_bytes, n_blocks, n_nested = lay.totals()
    num = len(experts)
    for e in range(num):
        for role in roles:
            key, rec = experts[e][role]
            _check_record(rec, key, role, first, first_key, lay, where, name)
    quant_map = first.quant_map.float().contiguous()
    names = roles if projs is not None else tuple(experts[0][role][0].rsplit(".", 2)[-2] for role in roles)
    if device.type == "meta":  # sizes only (estimate, inspect --memory): no expert byte read or held
        packed = torch.empty(num, n_bytes, dtype=torch.uint8, device=device)
        absmax = torch.empty(num, n_blocks, dtype=torch.float32, device=device)
        meta_nested = None
        if first.nested is not None:  # the host copies a load keeps for saving (below), sized
            meta_nested = {
                "codes": torch.empty(num, n_blocks, dtype=torch.uint8, device=device),
                "absmax": torch.empty(num, n_nested, dtype=torch.float32, device=device),
                "offset": torch.empty(num, len(roles), dtype=torch.float32, device=device),
                "map": torch.empty(first.nested.nested_quant_map.numel(), dtype=torch.float32, device=device),
            }
        return StackedExperts(packed, absmax, quant_map.to(device), bs, qt, dtype, names, meta_nested)  # type: ignore[arg-type]
    nested_map = first.nested.nested_quant_map if first.nested is not None else None
    keep_nested = nested_map is not None and _all_nested_alike(experts, nested_map)
    work = first.packed.device
    packed = torch.empty(num, n_bytes, dtype=torch.uint8, device=work)
    absmax = torch.empty(num, n_blocks, dtype=torch.float32, device=work)
    if keep_nested:  # the absmax is decoded from them below; saving reads them (kept on the CPU)
        codes = torch.empty(num, n_blocks, dtype=torch.uint8, device=work)
        nabs = torch.empty(num, n_nested, dtype=torch.float32, device=work)
        offsets = torch.empty(num, len(roles), dtype=torch.float32)
    for e in range(num):
        for r, role in enumerate(roles):
            _, rec = experts[e][role]
            po, ao, no = lay.offsets(role)
            data = ops.packed_bytes(rec.packed)
            packed[e, po : po + data.numel()] = data
            if keep_nested:
                codes[e, ao : ao + lay.blocks(role)] = rec.absmax.reshape(-1)
                na = rec.nested.nested_absmax.reshape(-1)
                nabs[e, no : no + na.numel()] = na
                offsets[e, r] = float(rec.nested.offset)
            else:
                amax = ops.decoded_absmax(state_from_record(rec)).reshape(-1)
                absmax[e, ao : ao + amax.numel()] = amax
    if keep_nested:
        table = nested_map.float().to(work)
        shift = offsets.to(work)
        for r, role in enumerate(roles):
            _, ao, no = lay.offsets(role)
            nb, nn_ = lay.blocks(role), lay.nested_blocks(role)
            scale = nabs[:, no : no + nn_].repeat_interleave(NESTED_BLOCKSIZE, dim=1)[:, :nb]
            # Two separate float32 ops, a product then a sum, as ops.decoded_absmax and the kernels.
            decoded = table[codes[:, ao : ao + nb].long()] * scale
            absmax[:, ao : ao + nb] = decoded + shift[:, r : r + 1]
    packed, absmax = packed.to(device), absmax.to(device)
    nested = None
    if keep_nested:
        nested = {
            "codes": host(codes),
            "absmax": host(nabs),
            "offset": offsets,
            "map": host(nested_map.float()),
        }
    return StackedExperts(packed, absmax, quant_map.to(device), bs, qt, dtype, names, nested)  # type: ignore[arg-type]


def host(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU; a meta tensor (a header-only ``estimate``: converter.loader.hub_headers) stays
    meta, having no data to copy."""
    return t if t.is_meta else t.cpu()


def _own(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor with storage of its own (slices of one buffer would be shared tensors to the saver);
    a meta tensor (``estimate``'s skeleton: accelerate's check_device_map lists its state_dict) stays
    meta, having no data to copy."""
    return t.detach().to("meta" if t.is_meta else "cpu", copy=True)


def span_record(
    module: Any,
    nested: dict[str, torch.Tensor] | None,
    name: str,
    shape: tuple[int, ...],
    experts: int | slice,
    spans: tuple[tuple[int, int], tuple[int, int], tuple[int, int]],
    role: int,
) -> QuantizedTensor:
    """A bnb record (own CPU tensors) of the ``experts`` rows (one expert, or all: a fused record) of a
    QuantExperts4bit's stacked buffers over the (packed bytes, absmax blocks, nested blocks) ``spans``;
    ``role``: the ROLES index whose nested offset the record takes (``nested``: ``nested_buffers()``)."""
    (p0, p1), (a0, a1), (n0, n1) = spans
    packed = _own(module.packed[experts, p0:p1]).reshape(-1, 1)
    if nested is not None:
        absmax = _own(nested["codes"][experts, a0:a1]).reshape(-1)
        first = experts if isinstance(experts, int) else 0  # a fused record's experts share one offset
        offset = nested["offset"][first, role]
        extra = NestedAbsmax(
            _own(nested["absmax"][experts, n0:n1]).reshape(-1),
            _own(nested["map"]),  # a copy per record: the saver rejects shared tensors
            0.0 if offset.is_meta else float(offset),  # a header-only skeleton's: no value to read
        )
    else:
        absmax, extra = _own(module.absmax[experts, a0:a1]).reshape(-1), None
    return QuantizedTensor(
        name=name,
        shape=shape,
        dtype=module.dtype_name,
        quant_type=QuantType.parse(module.quant_type),
        blocksize=module.blocksize,
        packed=packed,
        absmax=absmax,
        quant_map=_own(module.quant_map),
        nested=extra,
    )


def expert_state_dict(
    module: Any,
    prefix: str,
    lay: ExpertsLayout | None = None,
    key: Callable[[int, int, str], str] | None = None,
    extra: Callable[[int, int, str], dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """The per-expert bnb records of a QuantExperts4bit under ``prefix`` (``...experts.``), on the CPU.

    ``lay``: the layer's layout (default gate, up, down); ``key(e, r, role)``: a record's name (default
    ``<prefix><e>.<proj_names[r]>.weight``); ``extra(e, r, role)``: tensors written right after that
    record (gpt-oss: its bias)."""
    lay = lay or ExpertsLayout(module.hidden_dim, module.intermediate_dim, module.blocksize)
    nested = module.nested_buffers()
    out: dict[str, torch.Tensor] = {}
    for e in range(module.num_experts):
        for r, role in enumerate(lay.roles):
            name = key(e, r, role) if key is not None else f"{prefix}{e}.{module.proj_names[r]}.weight"
            out.update(span_record(module, nested, name, lay.shape(role), e, lay.spans(role), r).state_dict())
            if extra is not None:
                out.update(extra(e, r, role))
    return out
