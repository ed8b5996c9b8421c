"""Llama 4's fused routed experts seen as the per-expert ``nn.Linear`` weights transformers loads.

Llama 4 (``Llama4ForCausalLM``, ``Llama4ForConditionalGeneration``: Scout, Maverick) stores a MoE
layer's routed experts as two 3-D tensors in ``x @ W`` orientation::

    <layer>.feed_forward.experts.gate_up_proj  [E, H, 2I]   gate = [..., :I], up = [..., I:]
    <layer>.feed_forward.experts.down_proj     [E, I, H]

When transformers loads a *pre-quantized* bitsandbytes checkpoint it first replaces every
``Llama4TextExperts`` by ``SequentialLlama4TextExperts`` (``transformers.quantizers.base``,
``MODULES_TO_PATCH_FOR_QUANTIZATION``): a ModuleList of ``Llama4TextMLP`` with ``nn.Linear``
``gate_proj [I, H]``, ``up_proj [I, H]`` and ``down_proj [H, I]``, whose keys are
``...feed_forward.experts.<e>.gate_proj.weight`` and so on. A folder with the fused tensors cannot fill
that model, so :class:`Llama4ExpertsSource` wraps any Source (local, Hub, the block-FP8 view) and shows
the per-expert 2-D weights instead of the fused ones::

    experts.<e>.gate_proj.weight = gate_up_proj[e][:, :I].T
    experts.<e>.up_proj.weight   = gate_up_proj[e][:, I:].T
    experts.<e>.down_proj.weight = down_proj[e].T

each read as expert ``e``'s block of the fused tensor only (``get_rows``: a memory map or HTTP range of
those bytes; gate and up share one read of the block when read one after the other), made contiguous.
The tensor list keeps the source's dtype; each weight's size is its own bytes, so the sizes still add
up to the source's. ``dequantize`` fuses them back (``converter/loader/dequantize.py``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from converter.errors import InputError
from converter.sources.base import Source, TensorInfo
from converter.sources.view import PerExpertFile, PerExpertView, expert_block, per_expert_listing

__all__ = [
    "EXPERT_KEY",
    "FUSED_KEY",
    "LLAMA4_MODEL_TYPES",
    "Llama4ExpertsSource",
    "fused_block",
    "is_llama4",
    "wrap_if_llama4",
]

#: config.json model_type of Llama 4 (the multimodal model and its text model).
LLAMA4_MODEL_TYPES = frozenset({"llama4", "llama4_text"})

#: A fused Llama 4 experts tensor on disk.
FUSED_KEY = re.compile(r"^(?P<module>.+\.feed_forward\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
#: A per-expert weight as this view shows it (and a converted folder holds it): experts module, expert
#: index, part (gate / up / down). The plan's MoE rules and ``dequantize``'s re-fuse read it.
EXPERT_KEY = re.compile(
    r"^(?P<module>.+\.feed_forward\.experts)\.(?P<e>\d+)\.(?P<p>gate|up|down)_proj\.weight$"
)


class Llama4LayoutError(InputError):
    """A Llama 4 checkpoint whose fused expert tensors do not have the shapes Llama 4 gives them."""


def is_llama4(config: dict | None) -> bool:
    """Whether ``config.json`` describes a Llama 4 model (text-only or multimodal)."""
    return isinstance(config, dict) and config.get("model_type") in LLAMA4_MODEL_TYPES


def fused_block(weights: Sequence[Any]) -> Any:
    """Expert e's block of a fused tensor from its per-expert nn.Linear weights, the inverse of this view's
    reads: ``gate_up_proj[e] = cat([gate.T, up.T], 1)``, ``down_proj[e] = down.T`` (torch tensors)."""
    import torch

    return torch.cat([w.T for w in weights], dim=1)


def _per_expert(tensors: list[TensorInfo]) -> dict[str, tuple[str, int, str, int]]:
    """Each virtual per-expert weight -> (fused tensor name, expert, part, I) for the fused tensors of
    ``tensors``; raises Llama4LayoutError for shapes Llama 4 does not have."""
    fused: dict[str, dict[str, TensorInfo]] = {}
    for t in tensors:
        m = FUSED_KEY.match(t.name)
        if m is not None:
            fused.setdefault(m["module"], {})[m["proj"]] = t
    out: dict[str, tuple[str, int, str, int]] = {}
    for module, parts in fused.items():
        gu, dn = parts.get("gate_up_proj"), parts.get("down_proj")
        if gu is None or dn is None:
            have = next(iter(parts.values())).name
            msg = f"{have}: the checkpoint holds only one of {module}.gate_up_proj / down_proj (damaged)"
            raise Llama4LayoutError(msg)
        ok = len(gu.shape) == 3 and len(dn.shape) == 3 and gu.shape[0] == dn.shape[0]
        ok = ok and gu.shape[2] % 2 == 0 and gu.shape[1] == dn.shape[2] and gu.shape[2] // 2 == dn.shape[1]
        if not ok:
            msg = (
                f"{gu.name} {list(gu.shape)} and {dn.name} {list(dn.shape)}: Llama 4 stores fused experts as "
                "gate_up_proj [E, H, 2I] and down_proj [E, I, H]; the checkpoint does not (a damaged source)"
            )
            raise Llama4LayoutError(msg)
        inter = dn.shape[1]
        for e in range(gu.shape[0]):
            out[f"{module}.{e}.gate_proj.weight"] = (gu.name, e, "gate", inter)
            out[f"{module}.{e}.up_proj.weight"] = (gu.name, e, "up", inter)
            out[f"{module}.{e}.down_proj.weight"] = (dn.name, e, "down", inter)
    return out


def _listing(tensors: list[TensorInfo], virtual: dict[str, tuple[str, int, str, int]]) -> list[TensorInfo]:
    """``tensors`` with each fused tensor replaced, where it stood, by its per-expert weights."""

    def entry(t: TensorInfo, name: str) -> tuple[tuple[int, ...], int]:
        inter = virtual[name][3]
        if t.name.endswith(".down_proj"):  # down [E, I, H] -> [H, I]
            return (t.shape[2], inter), t.nbytes // t.shape[0]
        return (inter, t.shape[1]), t.nbytes // (2 * t.shape[0])  # gate_up [E, H, 2I] -> [I, H] each

    return per_expert_listing(tensors, {n: v[0] for n, v in virtual.items()}, entry)


class _Llama4File(PerExpertFile):
    """An open weight file whose per-expert weights are cut out of the fused tensors on read."""

    def __init__(self, owner: PerExpertView, inner: Any) -> None:
        super().__init__(owner, inner)
        #: the last expert block read, ((fused name, expert), rows): gate then up read it once
        self._last: tuple[tuple[str, int], Any] | None = None

    def cut(self, where: tuple) -> Any:
        src, e, part, inter = where
        if self._last is not None and self._last[0] == (src, e):
            block = self._last[1]
        else:
            self._last = None  # the previous block goes before the next is read
            block = expert_block(self.inner, src, e)
            if part != "down":
                self._last = ((src, e), block)
        if part == "gate":
            block = block[:, :inter]
        elif part == "up":
            self._last = None  # gate and up of this expert are read: one block kept at most
            block = block[:, inter:]
        return block.T.contiguous()


class Llama4ExpertsSource(PerExpertView):
    """A Llama 4 source with per-expert 2-D expert weights (see the module docstring)."""

    DESCRIBE = ("llama4_experts", "fused -> per-expert nn.Linear weights")
    file_class = _Llama4File

    def __init__(self, inner: Source) -> None:
        tensors = inner.tensors()
        virtual = _per_expert(tensors)
        super().__init__(inner, virtual, _listing(tensors, virtual))


def wrap_if_llama4(src: Source) -> Source:
    """``src`` itself, or a :class:`Llama4ExpertsSource` over it when it is Llama 4 with fused experts."""
    if not is_llama4(src.config()) or not any(FUSED_KEY.match(t.name) for t in src.tensors()):
        return src
    return Llama4ExpertsSource(src)
