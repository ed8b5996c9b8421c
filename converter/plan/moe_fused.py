"""Fused 3-D expert tensors on disk (Qwen3-VL-MoE): which can be quantized, and in which orientation.

Qwen3-VL-MoE ships a layer's routed experts as two 3-D tensors, ``<layer>.mlp.experts.gate_up_proj``
``[E, H, 2I]`` and ``down_proj [E, I, H]`` (``x @ W``); transformers 5.x transposes them at load into
its model orientation ``[E, 2I, H]`` / ``[E, H, I]`` (``Transpose(1, 2, check_dims=True)``: a tensor
already in model orientation, as its own ``save_pretrained`` writes, is taken as is). ``--moe-experts
quantize`` writes one fused bnb 4-bit record per tensor in model orientation (the layout
transformers' ``save_original_format=False`` writes and unsloth-zoo's ``_FusedExpertDeserialize``
reads; ``../shared/reference/moe-4bit.md``), transposing a Hub-orientation tensor first, as GPT-2's
``Conv1D`` weights are; the per-tensor metadata records ``transposed`` so that ``dequantize`` writes
the original orientation back.

The orientation comes from the pair alone: model orientation has ``gate_up[2] == down[1]`` and
``gate_up[1] == 2 * down[2]``, Hub orientation ``gate_up[1] == down[2]`` and ``gate_up[2] == 2 *
down[1]``; both at once would need a zero dimension, so the headers decide without config.json.

gpt-oss stores fused experts too, but with biases, gate/up interleaved and its own clamped
activation: a ``quantize`` conversion reads them through converter/sources/gpt_oss.py as unsloth's
per-expert records, so they never reach this module; biased fused experts of another model stay 16 bit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

#: A fused 3-D experts tensor (one tensor for all experts of a layer).
FUSED_EXPERT_KEY = re.compile(
    r"^(?P<module>.+\.experts)\.(?P<proj>gate_up_proj|down_proj|up_proj|gate_proj)$"
)


class _TensorLike(Protocol):
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class FusedExperts:
    """One layer's fused experts as the converter quantizes them."""

    module: str  # e.g. "model.language_model.layers.0.mlp.experts"
    gate_up: str  # tensor names on disk
    down: str
    transpose: bool  # stored [E, H, 2I] / [E, I, H]: quantized as [E, 2I, H] / [E, H, I]


def swap_last(shape: Sequence[int]) -> tuple[int, ...]:
    """``shape`` with its last two dimensions swapped (``[in, out]`` -> ``[out, in]``; per expert for 3-D)."""
    s = tuple(shape)
    return (*s[:-2], s[-1], s[-2])


def orientation(gate_up: Sequence[int], down: Sequence[int]) -> bool | None:
    """True: Hub orientation (transpose to quantize); False: model orientation; None: neither (or not 3-D)."""
    if len(gate_up) != 3 or len(down) != 3 or gate_up[0] != down[0]:
        return None
    _, a, b = gate_up
    _, c, d = down
    if b == c and a == 2 * d:
        return False
    if a == d and b == 2 * c:
        return True
    return None


def fused_layers(tensors: Sequence[_TensorLike]) -> tuple[dict[str, FusedExperts], dict[str, str]]:
    """(tensor name -> its layer's :class:`FusedExperts` for the quantizable ones, tensor name -> why it
    stays 16 bit for the others) over the fused 3-D expert tensors of a checkpoint."""
    by_module: dict[str, dict[str, _TensorLike]] = {}
    names = {t.name for t in tensors}
    for t in tensors:
        m = FUSED_EXPERT_KEY.match(t.name)
        if m is not None:
            by_module.setdefault(m["module"], {})[m["proj"]] = t
    quantize: dict[str, FusedExperts] = {}
    keep: dict[str, str] = {}
    for module, parts in by_module.items():
        gu, dn = parts.get("gate_up_proj"), parts.get("down_proj")
        why = None
        if gu is None or dn is None or set(parts) != {"gate_up_proj", "down_proj"}:
            why = "fused experts without one gate_up_proj and one down_proj: no loader runs them 4-bit"
        elif f"{gu.name}_bias" in names or f"{dn.name}_bias" in names:
            why = (
                "fused experts with biases: only gpt-oss's (config.json model_type gpt_oss) are "
                "quantized, as per-expert records (converter/sources/gpt_oss.py); no loader here runs "
                "these 4-bit"
            )
        else:
            transpose = orientation(gu.shape, dn.shape)
            if transpose is None:
                why = f"fused experts of shapes {list(gu.shape)} and {list(dn.shape)} fit no known layout"
            else:
                fused = FusedExperts(module, gu.name, dn.name, transpose)
                quantize[gu.name] = quantize[dn.name] = fused
                continue
        for t in parts.values():
            keep[t.name] = why
    return quantize, keep
