"""Known projection layers per architecture family, for tensor selection without transformers.

Each family lists the leaf module names whose ``.weight`` transformers + bitsandbytes quantize
(``nn.Linear``, or GPT-2 ``Conv1D`` which is stored ``[in, out]`` and quantized transposed), and
what never gets quantized although its name looks like a projection: per-expert MoE weights that
transformers >= 5 fuses into one 3-D parameter on load, and ``_keep_in_fp32_modules``.

transformers also skips "the module of the last parameter" of the model as from_pretrained builds it
(untied, so the lm_head, or a final norm with weights): never a projection, so the table can ignore it
(OLMo (v1), whose norms have no weights, too: its last parameter is the untied lm_head).

The table is conservative: it never selects a weight transformers would leave unquantized
(tests/selection/test_allowlist.py compares every family with the transformers-based selection
on tiny models); heads such as a sequence-classification ``classifier`` stay unquantized.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    model_types: frozenset[str]
    linear: frozenset[str]  # leaf module names whose .weight is quantized
    transpose: bool = False  # Conv1D weights: quantize W.T
    exclude: tuple[tuple[str, str], ...] = ()  # (regex on the module name, reason) never quantized
    keep_fp32: tuple[str, ...] = ()  # regexes of _keep_in_fp32_modules (searched in the key)
    base_prefixes: tuple[str, ...] = ()  # base_model_prefix values, stripped in llm_int8_skip_modules
    # always in llm_int8_skip_modules: heads that may have no tensor in the checkpoint (tied to the
    # input embedding) but are nn.Linear in the model, which transformers would otherwise swap
    always_skip: tuple[str, ...] = ("lm_head",)


_EXPERTS = (r"\.experts\.\d+\.", "fused MoE experts (merged on load)")
_ROUTER = (r"(^|\.)(gate|router|shared_expert_gate)$", "router")

FAMILIES: tuple[Family, ...] = (
    Family(
        name="llama-style decoder",
        model_types=frozenset(
            {
                "llama",
                "mistral",
                "mixtral",
                "qwen2",
                "qwen2_moe",
                "qwen3",
                "qwen3_moe",
                "gemma",
                "gemma2",
                "olmo",
                "olmo2",
                "granite",
                "smollm3",
            }
        ),
        linear=frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        exclude=(_EXPERTS, _ROUTER),
        base_prefixes=("model",),
    ),
    Family(
        name="phi3",
        model_types=frozenset({"phi3"}),
        linear=frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
        base_prefixes=("model",),
    ),
    Family(
        name="gpt2",
        model_types=frozenset({"gpt2"}),
        linear=frozenset({"c_attn", "c_proj", "c_fc"}),
        transpose=True,
        base_prefixes=("transformer",),
    ),
    Family(
        name="bert-style encoder",
        model_types=frozenset({"bert", "roberta", "xlm-roberta"}),
        linear=frozenset({"query", "key", "value", "dense"}),
        # the MLM head's transform.dense is nn.Linear too, but keep heads out of a conservative table
        exclude=((r"(^|\.)cls\.|(^|\.)lm_head\.", "task head (not in the allowlist)"),),
        base_prefixes=("bert", "roberta"),
        always_skip=("lm_head", "cls"),
    ),
    Family(
        name="t5",
        model_types=frozenset({"t5", "mt5", "umt5"}),
        linear=frozenset({"q", "k", "v", "o", "wi", "wi_0", "wi_1"}),
        exclude=((r"\.wo$", "_keep_in_fp32_modules"),),
        keep_fp32=("wo",),
        base_prefixes=("transformer",),
    ),
)


def family_for(model_type: str | None) -> Family | None:
    """The family whose table covers ``model_type``, or None."""
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    return None


def known_model_types() -> list[str]:
    return sorted(t for fam in FAMILIES for t in fam.model_types)


def excluded(fam: Family, module: str) -> str | None:
    """Reason the family never quantizes ``module`` (checkpoint module name), or None."""
    for pattern, reason in fam.exclude:
        if re.search(pattern, module):
            return reason
    return None
