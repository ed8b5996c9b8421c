"""gpt-oss's fused routed experts seen as unsloth's per-expert ``nn.Linear`` records.

gpt-oss (``GptOssForCausalLM``; the bf16 checkpoints such as ``unsloth/gpt-oss-20b-BF16``) stores a
MoE layer's routed experts as fused 3-D tensors in ``x @ W`` orientation, with biases::

    <layer>.mlp.experts.gate_up_proj       [E, H, 2I]   gate = [..., ::2], up = [..., 1::2] (interleaved)
    <layer>.mlp.experts.gate_up_proj_bias  [E, 2I]
    <layer>.mlp.experts.down_proj          [E, I, H]
    <layer>.mlp.experts.down_proj_bias     [E, H]

No stock loader reads a bitsandbytes gpt-oss folder (``../shared/reference/moe-4bit.md``); unsloth's
``GptOssExpertsBnb4bit`` reads per-expert ``nn.Linear`` records, and ``--moe-experts quantize`` writes
those (:class:`GptOssExpertsSource` wraps the source for that run only; ``keep`` leaves it as it is)::

    <layer>.mlp.experts.gate_up_projs.<e>.weight = gate_up_proj[e].T   [2I, H] (rows stay interleaved)
    <layer>.mlp.experts.gate_up_projs.<e>.bias   = gate_up_proj_bias[e]
    <layer>.mlp.experts.down_projs.<e>.weight    = down_proj[e].T      [H, I]
    <layer>.mlp.experts.down_projs.<e>.bias      = down_proj_bias[e]

each read as expert ``e``'s block of the fused tensor only (``get_rows``), made contiguous. The weights
are quantized like any nn.Linear weight, the biases stay 16 bit. The loader stacks them again
(converter/loader/moe_gpt_oss.py), ``dequantize`` fuses them back (converter/loader/dequantize.py).
"""

from __future__ import annotations

import re
from typing import Any

from converter.errors import InputError
from converter.sources.base import Source, TensorInfo
from converter.sources.view import PerExpertFile, PerExpertView, expert_block, per_expert_listing

__all__ = [
    "EXPERT_KEY",
    "FUSED_KEY",
    "GptOssExpertsSource",
    "is_gpt_oss",
    "wrap_if_gpt_oss",
]

#: A fused gpt-oss experts tensor on disk (weights and biases).
FUSED_KEY = re.compile(r"^(?P<module>.+\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)(?P<bias>_bias)?$")
#: A per-expert record as this view shows it (and a converted folder holds it): unsloth's names.
EXPERT_KEY = re.compile(
    r"^(?P<module>.+\.mlp\.experts)\.(?P<proj>gate_up_projs|down_projs)\.(?P<e>\d+)\.(?P<kind>weight|bias)$"
)


class GptOssLayoutError(InputError):
    """A gpt-oss checkpoint whose fused expert tensors do not have the shapes gpt-oss gives them."""


def is_gpt_oss(config: dict | None) -> bool:
    """Whether ``config.json`` describes a gpt-oss model."""
    return isinstance(config, dict) and config.get("model_type") == "gpt_oss"


def _per_expert(tensors: list[TensorInfo]) -> dict[str, tuple[str, int, bool]]:
    """Each virtual per-expert tensor -> (fused tensor name, expert, is a weight: transposed on read)."""
    fused: dict[str, dict[str, TensorInfo]] = {}
    for t in tensors:
        m = FUSED_KEY.match(t.name)
        if m is not None:
            fused.setdefault(m["module"], {})[m["proj"] + (m["bias"] or "")] = t
    out: dict[str, tuple[str, int, bool]] = {}
    for module, parts in fused.items():
        want = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
        missing = [p for p in want if p not in parts]
        if missing:
            have = next(iter(parts.values())).name
            msg = (
                f"{have}: the checkpoint lacks {module}.{missing[0]} (gpt-oss experts need all four tensors)"
            )
            raise GptOssLayoutError(msg)
        gu, gb, dn, db = (parts[p] for p in want)
        ok = len(gu.shape) == 3 and len(dn.shape) == 3 and len(gb.shape) == 2 and len(db.shape) == 2
        ok = ok and gu.shape[0] == dn.shape[0] == gb.shape[0] == db.shape[0]
        ok = (
            ok and gu.shape[1] == dn.shape[2] == db.shape[1] and gu.shape[2] == 2 * dn.shape[1] == gb.shape[1]
        )
        if not ok:
            msg = (
                f"{gu.name} {list(gu.shape)}, {dn.name} {list(dn.shape)} and their biases {list(gb.shape)}, "
                f"{list(db.shape)}: gpt-oss stores fused experts as gate_up_proj [E, H, 2I], down_proj "
                "[E, I, H], gate_up_proj_bias [E, 2I], down_proj_bias [E, H]; the checkpoint does not"
            )
            raise GptOssLayoutError(msg)
        for e in range(gu.shape[0]):
            out[f"{module}.gate_up_projs.{e}.weight"] = (gu.name, e, True)
            out[f"{module}.gate_up_projs.{e}.bias"] = (gb.name, e, False)
            out[f"{module}.down_projs.{e}.weight"] = (dn.name, e, True)
            out[f"{module}.down_projs.{e}.bias"] = (db.name, e, False)
    return out


def _listing(tensors: list[TensorInfo], virtual: dict[str, tuple[str, int, bool]]) -> list[TensorInfo]:
    """``tensors`` with each fused tensor replaced, where it stood, by its per-expert tensors."""

    def entry(t: TensorInfo, name: str) -> tuple[tuple[int, ...], int]:
        shape = tuple(t.shape[1:])
        shape = (shape[1], shape[0]) if len(shape) == 2 else shape  # weights: [in, out] -> [out, in]
        return shape, t.nbytes // t.shape[0]

    return per_expert_listing(tensors, {n: v[0] for n, v in virtual.items()}, entry)


class _GptOssFile(PerExpertFile):
    """An open weight file whose per-expert tensors are cut out of the fused ones on read."""

    def cut(self, where: tuple) -> Any:
        src, e, weight = where
        block = expert_block(self.inner, src, e)
        return block.T.contiguous() if weight else block.contiguous()


class GptOssExpertsSource(PerExpertView):
    """A gpt-oss source with unsloth's per-expert records (see the module docstring)."""

    DESCRIBE = ("gpt_oss_experts", "fused -> per-expert nn.Linear records")
    file_class = _GptOssFile

    def __init__(self, inner: Source) -> None:
        tensors = inner.tensors()
        virtual = _per_expert(tensors)
        super().__init__(inner, virtual, _listing(tensors, virtual))


def wrap_if_gpt_oss(src: Source) -> Source:
    """``src`` itself, or a :class:`GptOssExpertsSource` over it when it is gpt-oss with fused 16-bit
    experts (``gate_up_proj`` beside ``gate_up_proj_bias``; MXFP4's ``_blocks`` / ``_scales`` are not)."""
    if not is_gpt_oss(src.config()):
        return src
    names = {t.name for t in src.tensors()}
    if not any(FUSED_KEY.match(n) and not n.endswith("_bias") and f"{n}_bias" in names for n in names):
        return src
    return GptOssExpertsSource(src)
