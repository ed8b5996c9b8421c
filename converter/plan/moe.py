"""Mixture-of-Experts checkpoints: which tensors are experts, and ``--moe-experts keep|quantize``.

Hub MoE checkpoints (Qwen2/3-MoE, OLMoE, GLM-4.x MoE, DeepSeek-V2/V3, Mixtral) store one 2-D tensor
per expert per projection: ``<layer>.mlp.experts.<e>.{gate,up,down}_proj.weight`` (Mixtral:
``block_sparse_moe.experts.<e>.w1/w3/w2.weight``). transformers 5.x fuses them at load into 3-D
parameters, which bitsandbytes can neither quantize nor load pre-quantized, so the default selection
keeps them in 16 bit (``keep``: the folder loads with stock transformers + bitsandbytes).

``quantize`` writes one ordinary bnb 4-bit record per expert per projection under the checkpoint's
own names (the transformers-4.x / vLLM / unsloth layout, ``../shared/reference/moe-4bit.md``), with
the same quant type, blocksize and nesting as every other weight. Routers stay 16 bit and their leaf
names are added to ``llm_int8_skip_modules`` (vLLM's bnb loader matches single dotted components).
Shared experts are ordinary ``nn.Linear`` layers in transformers and already quantized by the
normal selection. Fused 3-D expert tensors on disk (Qwen3-VL-MoE) become one fused bnb record per
tensor in transformers' model orientation (converter/plan/moe_fused.py). gpt-oss's biased fused
experts are written as unsloth's per-expert ``nn.Linear`` records (``experts.gate_up_projs.<e>.weight``,
converter/sources/gpt_oss.py shows them so for a ``quantize`` run): the weights 4-bit, the biases 16-bit;
with ``keep`` they stay fused and 16 bit as before.

This module only looks at tensor names, shapes and dtypes; it never imports transformers.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Protocol

from converter.errors import InputError
from converter.plan.moe_fused import FUSED_EXPERT_KEY, fused_layers
from converter.plan.transformers4_types import TRANSFORMERS4_MODEL_TYPES
from converter.sources.gpt_oss import EXPERT_KEY as GPT_OSS_EXPERT
from converter.sources.llama4 import EXPERT_KEY as LLAMA4_EXPERT
from converter.sources.llama4 import is_llama4

MOE_MODES = ("keep", "quantize")

#: A per-expert projection weight: (experts module, expert index, projection leaf name).
EXPERT_KEY = re.compile(
    r"^(?P<module>.+\.experts)\.(?P<index>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$"
)
#: Router weights (16-bit everywhere: vLLM and unsloth expect them so); their leaf goes to the skip list.
#: A router module itself (``mlp.gate``, ``router``, ``shared_expert_gate``), or the linear of a router
#: built around one (HunYuan-MoE's ``mlp.gate.wg``, LongCat-Flash's ``mlp.router.classifier``): leaves
#: that name nothing else in these models, so the skip entry keeps no other module 16-bit.
_ROUTER_KEY = re.compile(
    r"^(?P<module>.+\.(?:(?P<leaf>gate|router|shared_expert_gate)|(?:gate|router)\.(?P<inner>wg|classifier)))"
    r"\.weight$"
)

#: Projection leaf -> role (gate, up, down); Mixtral names them w1 (gate), w3 (up), w2 (down).
PROJ_ROLE = {
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "w1": "gate",
    "w3": "up",
    "w2": "down",
}

#: The projection leaves of experts without a gate (NemotronH's: ``down(act(up(x)))``).
_UNGATED_LEAVES = frozenset({"up_proj", "down_proj"})

_QUANTIZABLE = frozenset({"F32", "F16", "BF16", "F64"})

#: Who reads which layout (reference/moe-4bit.md, late 2026).
LOADERS_QUANTIZED = (
    "quantize-model load_quantized (4-bit experts run by its own kernels)",
    "vLLM pre-quantized bitsandbytes (NF4, uint8 storage, tensor parallel 1)",
    "transformers 4.x + bitsandbytes",
    "transformers 5.x + unsloth-zoo (Jul 2026 or later)",
)
NOT_LOADERS_QUANTIZED = ("stock transformers 5.x + bitsandbytes (cannot load 4-bit experts)",)
#: Per-expert records of experts without a gate projection (NemotronH's up_proj / down_proj,
#: converter/loader/moe_ungated.py): no other loader of 4-bit experts is known to run them.
LOADERS_UNGATED = LOADERS_QUANTIZED[:1]
NOT_LOADERS_UNGATED = (
    *NOT_LOADERS_QUANTIZED,
    "vLLM pre-quantized bitsandbytes and unsloth-zoo (not known to run 4-bit experts without a gate)",
)
LOADERS_KEPT = (
    "stock transformers 5.x + bitsandbytes (experts stay 16-bit)",
    "quantize-model load_quantized",
    "transformers 5.x + unsloth-zoo",
)
#: LongCat-Flash's zero (identity) experts' gate/up weights without a down weight, as transformers 5.24's
#: save_pretrained writes them (``zero_expert_modules``): 5.25's LongcatFlashExperts has no rows for them.
LOADERS_ZERO_EXPERTS = (
    "stock transformers 5.0-5.24 + bitsandbytes (experts stay 16-bit; 5.25 and later keep no rows for the "
    "zero experts and refuse their gate/up weights)",
    "quantize-model load_quantized",
)
#: Fused 3-D bnb records (Qwen3-VL-MoE's experts in model orientation, converter/plan/moe_fused.py).
LOADERS_FUSED = (
    "quantize-model load_quantized (4-bit experts run by its own kernels)",
    "transformers 5.x + unsloth-zoo (Jul 2026 or later: its fused 3-D bnb expert record)",
)
NOT_LOADERS_FUSED = (
    "stock transformers 5.x + bitsandbytes (cannot load 4-bit experts)",
    "vLLM pre-quantized bitsandbytes (no fused 3-D expert records: vllm#32013 was not merged)",
    "transformers 4.x (no such model class)",
)
NOT_LOADERS_KEPT = (
    "vLLM pre-quantized bitsandbytes (needs every expert quantized)",
    # checked with transformers 4.57 + bitsandbytes 0.50 (Qwen3-MoE, Mixtral): from_pretrained fails,
    # "Cannot copy out of meta tensor"
    "transformers 4.x + bitsandbytes (its experts and routers are nn.Linear layers, not in "
    "llm_int8_skip_modules: it expects 4-bit records for the 16-bit weights and fails)",
)
#: Experts of a layout quantize-model does not quantize (other_experts: Granite, JetMoE, DBRX, Ergo), 16-bit:
#: the folder is an ordinary bnb folder of the model (keep_advice says the same).
LOADERS_OTHER = ("stock transformers + bitsandbytes (experts stay 16-bit)", "quantize-model load_quantized")
NOT_LOADERS_OTHER: tuple[str, ...] = ()
#: Llama 4: transformers builds its experts as per-expert nn.Linear for a pre-quantized bnb checkpoint
#: (``SequentialLlama4TextExperts``), so per-expert 4-bit records load with stock transformers too.
LOADERS_LLAMA4_QUANTIZED = (
    "quantize-model load_quantized",
    "stock transformers 5.x + bitsandbytes (Llama 4: its per-expert Linear4bit experts)",
)
LOADERS_LLAMA4_KEPT = (
    "stock transformers + bitsandbytes (experts stay 16-bit: listed in llm_int8_skip_modules)",
    "quantize-model load_quantized",
)
#: gpt-oss: unsloth's per-expert nn.Linear records (converter/sources/gpt_oss.py); transformers' own
#: GptOssExperts is fused 3-D with biases, and vLLM has no bitsandbytes gpt-oss.
LOADERS_GPT_OSS = (
    "quantize-model load_quantized (4-bit experts run by its own kernels)",
    "transformers 5.x + unsloth (gpt-oss bnb-4bit: per-expert gate_up_projs / down_projs Linear records)",
)
NOT_LOADERS_GPT_OSS = (
    "stock transformers 5.x + bitsandbytes (GptOssExperts is fused 3-D: no place for per-expert records)",
    "vLLM pre-quantized bitsandbytes (GptOssForCausalLM has no bitsandbytes support: vllm#25653)",
)
#: A folder with no quantized weight at all (a source checkpoint).
NOT_CONVERTED = (
    "quantize-model load_quantized and the pre-quantized bitsandbytes loaders (no weight is quantized: "
    "convert the checkpoint first)"
)
#: Per-expert LLM.int8 records (transformers 4.x's load_in_8bit of per-expert nn.Linear experts).
LOADERS_INT8 = ("transformers 4.x + bitsandbytes",)
NOT_LOADERS_INT8 = (
    "stock transformers 5.x + bitsandbytes (cannot load quantized experts)",
    "quantize-model load_quantized (LLM.int8 experts: run `quantize-model dequantize` first)",
    "vLLM pre-quantized bitsandbytes (no 8-bit MoE)",
)


class _TensorLike(Protocol):
    name: str
    dtype: str
    shape: tuple[int, ...]


class HeaderTensor(NamedTuple):
    """A tensor as a safetensors header describes it (a ``_TensorLike``)."""

    name: str
    dtype: str  # safetensors code: "BF16", "F32", ...
    shape: tuple[int, ...]


class MoeOptionError(InputError):
    """A bad --moe-experts value."""


def check_mode(mode: str) -> str:
    m = str(mode).lower()
    if m not in MOE_MODES:
        msg = f"--moe-experts {mode!r} is not supported: use keep or quantize"
        raise MoeOptionError(msg)
    return m


@dataclass(frozen=True)
class ExpertKey:
    module: str  # checkpoint name of the experts module, e.g. "model.layers.0.mlp.experts"
    index: int
    proj: str  # leaf as on disk: gate_proj / up_proj / down_proj / w1 / w3 / w2


def is_expert_weight(name: str) -> bool:
    """A routed-expert weight: per-expert 2-D (gpt-oss's per-expert records too) or fused 3-D."""
    return bool(EXPERT_KEY.match(name) or FUSED_EXPERT_KEY.match(name) or _gpt_oss_weight(name))


def _gpt_oss_weight(name: str) -> bool:
    """gpt-oss's per-expert record weight (``experts.gate_up_projs.<e>.weight``; not its bias)."""
    m = GPT_OSS_EXPERT.match(name)
    return m is not None and m["kind"] == "weight"


def parse_expert_key(name: str) -> ExpertKey | None:
    m = EXPERT_KEY.match(name)
    if m is None:
        return None
    return ExpertKey(m["module"], int(m["index"]), m["proj"])


def is_llama4_layout(names: Iterable[str], config: Any = None) -> bool:
    """Whether per-expert weights are Llama 4's (transformers builds them as per-expert nn.Linear): from
    config.json's model_type when given, else from the names alone (``<layer>.feed_forward.experts.<e>.*``
    beside ``<layer>.feed_forward.shared_expert.*``; Jamba, the other model with ``feed_forward.experts``,
    has no shared expert)."""
    if isinstance(config, dict) and config.get("model_type"):
        return is_llama4(config)
    names = list(names)
    layers = {
        m["module"].removesuffix(".feed_forward.experts") for n in names if (m := LLAMA4_EXPERT.match(n))
    }
    return any(n.partition(".feed_forward.shared_expert.")[0] in layers for n in names)


def _numel(t: _TensorLike) -> int:
    n = 1
    for d in t.shape:
        n *= d
    return n


def expert_share(tensors: Sequence[_TensorLike]) -> tuple[int, int]:
    """(parameters in routed experts, all parameters) of a checkpoint, from its headers."""
    experts = sum(_numel(t) for t in tensors if is_expert_weight(t.name))
    return experts, sum(_numel(t) for t in tensors)


def is_moe(tensors: Sequence[_TensorLike]) -> bool:
    return any(is_expert_weight(t.name) for t in tensors)


#: Routed experts stored in a layout quantize-model does not quantize (they stay 16-bit whatever
#: ``--moe-experts`` says): Granite-MoE's (and Granite 4.0's, JetMoE's) fused 3-D
#: ``block_sparse_moe.input_linear`` / ``output_linear``, DBRX's ``ffn.experts.mlp.w1`` / ``v1`` / ``w2``,
#: Ergo's fused 3-D ``layers.<l>.feed_forward.up_proj`` / ``down_proj`` (``[E, H, I]`` / ``[E, I, H]``, no
#: gate, each expert followed by its own RMSNorm; transformers 5.25 loads them as ``mlp.experts.*``).
_OTHER_EXPERTS = re.compile(r"(?:^|\.)experts\.")
_OTHER_EXPERTS_3D = re.compile(
    r"(?:^|\.)(?:(?:block_sparse_moe|moe|mlp)\.(?:input|output)_linear\.weight|feed_forward\.(?:up|down)_proj)$"
)
#: Their routers: an nn.Linear ``router.layer`` (JetMoE's attention experts hold theirs under ``experts.``).
_OTHER_ROUTER = re.compile(r"(?:^|\.)router\.layer\.weight$")


def other_experts(tensors: Sequence[_TensorLike], quantized: Collection[str] = ()) -> list[_TensorLike]:
    """The routed-expert weights of a layout quantize-model does not quantize (see ``_OTHER_EXPERTS``):
    floating-point tensors of two or more dimensions under an experts module, or Granite's 3-D
    ``input_linear`` / ``output_linear`` (2-D ones are ``nn.Linear``) and Ergo's 3-D
    ``feed_forward.up_proj`` / ``down_proj``, that are neither per-expert,
    fused 3-D nor gpt-oss expert weights, nor routers (JetMoE's attention ``experts.router.layer`` too),
    nor in ``quantized`` (the selection's: experts that are ``nn.Linear`` modules, NLLB-MoE's
    ``experts.expert_0.fc1``, are quantized as any linear)."""
    quantized = set(quantized)
    return [
        t
        for t in tensors
        if t.name not in quantized
        and len(t.shape) >= 2
        and t.dtype in _QUANTIZABLE
        and (_OTHER_EXPERTS.search(t.name) or (len(t.shape) == 3 and _OTHER_EXPERTS_3D.search(t.name)))
        and not is_expert_weight(t.name)
        and not _ROUTER_KEY.match(t.name)
        and not _OTHER_ROUTER.search(t.name)
    ]


def may_be_other_expert(name: str) -> bool:
    """Whether the tensor ``name`` may be one of ``other_experts`` (its name alone; its shape and dtype
    decide): a cheap filter before reading shard headers."""
    return bool(_OTHER_EXPERTS.search(name) or _OTHER_EXPERTS_3D.search(name))


def _other_experts_named(others: Sequence[_TensorLike]) -> str:
    """'NAME and N more': the first of ``others`` named, and the count of the rest."""
    more = f" and {len(others) - 1} more" if len(others) > 1 else ""
    return f"{others[0].name}{more}"


def _other_experts_what(others: Sequence[_TensorLike]) -> str:
    """'the checkpoint's routed experts (NAME and N more) are ...': the first tensor named, and the count."""
    return (
        f"the checkpoint's routed experts ({_other_experts_named(others)}) are stored in a layout "
        "quantize-model does not quantize, so they stay 16-bit"
    )


def _other_experts_count(others: Sequence[_TensorLike]) -> int | None:
    """The experts that ``others`` hold: a 3-D tensor (Granite, JetMoE: ``[E, out, in]``) holds its first
    dimension's, once per module; None where a 2-D one (DBRX's ``[E * I, H]``) keeps its count out of the
    shapes."""
    modules: dict[str, int] = {}
    for t in others:
        if len(t.shape) != 3:
            return None
        modules[t.name.rsplit(".", 2)[0]] = t.shape[0]
    return sum(modules.values())


class MoeCheckpointError(InputError):
    """A checkpoint's per-expert tensors are incomplete or of mismatched shapes."""


_ROLE_LEAVES = {"gate_proj": ("gate_proj", "up_proj", "down_proj"), "w1": ("w1", "w3", "w2")}


#: config.json fields that give the number of routed experts per MoE layer.
_EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")


def _config_expert_count(config: Any) -> tuple[str, int] | None:
    if not isinstance(config, dict):
        return None
    for field in _EXPERT_COUNT_FIELDS:
        value = config.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return field, value
    return None


def _expert_widths(config: Any) -> list[int] | None:
    """ERNIE-4.5-VL's expert widths: a layer's experts module holds its text experts, then as many vision
    experts, each group of its own width, config.json's ``moe_intermediate_size`` list (text_config's in
    transformers' layout: ``[1536, 512]``); transformers splits them into ``text_moe`` / ``vision_moe``.
    None for any other checkpoint (one width)."""
    if not isinstance(config, dict):
        return None
    for c in (config, config.get("text_config")):
        widths = c.get("moe_intermediate_size") if isinstance(c, dict) else None
        if isinstance(widths, list) and len(widths) > 1 and all(type(w) is int for w in widths):
            return widths
    return None


def _zero_expert_rows(
    module: str,
    experts: Mapping[int, Mapping[str, _TensorLike]],
    count: tuple[str, int] | None,
    config: Any,
    names: tuple[str, str, str],
) -> str | None:
    """The refusal of LongCat-Flash's experts as transformers 5.24's ``save_pretrained`` writes them, else
    None. config.json's ``zero_expert_num`` zero-computation (identity) experts follow its
    ``n_routed_experts``; transformers' ``LongcatFlashExperts`` (up to 5.24; 5.25 holds the routed
    experts only) holds a ``gate_up_proj`` row for them too (never used: such an expert returns its input)
    but no ``down_proj``, so its checkpoint has gate and up weights of those experts and no down weight.
    Said as what it is, not as a damaged source."""
    zero = config.get("zero_expert_num") if isinstance(config, dict) else None
    if count is None or type(zero) is not int or zero <= 0:
        return None
    field, n = count
    gate, up, down = names
    extra = sorted(e for e in experts if e >= n)
    if extra != list(range(n, n + zero)) or any(down in experts[e] for e in extra):
        return None
    return (
        f"{module}: experts {n}..{n + zero - 1} have {gate} and {up} weights but no {down}: they are "
        f"config.json's zero_expert_num = {zero} zero-computation (identity) experts after its "
        f"{field} = {n}, whose unused gate/up rows transformers' save_pretrained writes (LongCat-Flash's "
        f"gate_up_proj holds {n + zero} experts, its down_proj {n}, up to transformers 5.24); --moe-experts "
        "quantize does not take them (no 4-bit expert loader reads an expert without its down weight): "
        "convert with --moe-experts keep (the default), which load_quantized loads, and stock transformers "
        "5.24 or older + bitsandbytes"
    )


def check_experts(tensors: Sequence[_TensorLike], config: Any = None, mode: str = "keep") -> None:
    """Refuse a checkpoint whose routed experts no loader can stack: an experts module missing an
    expert (a gap in its indices, or fewer or more experts than config.json's count) or one projection
    of an expert, or experts of different shapes (every loader stacks a layer's experts into one
    [E, ...] tensor; transformers, vLLM and ours alike). ERNIE-4.5-VL's text and vision experts (one
    experts module, a width per group: ``_expert_widths``), which transformers stacks a group at a time,
    may differ between the groups; ``--moe-experts quantize`` (``mode``) refuses them, naming why."""
    groups: dict[str, dict[int, dict[str, _TensorLike]]] = {}
    for t in tensors:
        key = parse_expert_key(t.name)
        if key is not None:
            groups.setdefault(key.module, {}).setdefault(key.index, {})[key.proj] = t
    count = _config_expert_count(config)
    widths = _expert_widths(config)
    for module, experts in groups.items():
        leaves = {p for parts in experts.values() for p in parts}
        names = _ROLE_LEAVES["w1"] if leaves & {"w1", "w2", "w3"} else _ROLE_LEAVES["gate_proj"]
        if leaves == _UNGATED_LEAVES:  # NemotronH's experts: no gate (up, act, down)
            names = ("up_proj", "down_proj")
        shapes: dict[str, tuple[tuple[int, ...], str]] = {}
        # ERNIE-4.5-VL: experts of each group (text, vision) alike; the groups' shapes may differ
        n_experts = max(experts) + 1
        per_group = n_experts // len(widths) if widths and n_experts % len(widths) == 0 else 0
        zero = _zero_expert_rows(module, experts, count, config, names)
        if zero is not None and check_mode(mode) == "quantize":
            raise MoeCheckpointError(zero)
        if zero is not None:  # keep: written as they are, which transformers 5.24's LongcatFlashExperts reads
            experts = {e: parts for e, parts in experts.items() if e < count[1]}  # type: ignore[index]
        if count is not None and max(experts) + 1 != count[1]:
            field, n = count
            what = f"only experts 0..{max(experts)}" if max(experts) < n else f"expert {max(experts)}"
            msg = (
                f"{module}: config.json has {field} = {n} but the checkpoint holds {what} of this layer "
                "(an incomplete or damaged source, or a config.json of another model)"
            )
            raise MoeCheckpointError(msg)
        for e in range(max(experts) + 1):
            parts = experts.get(e, {})
            for proj in names:
                t = parts.get(proj)
                if t is None:
                    msg = (
                        f"{module}.{e}.{proj}.weight is missing: the checkpoint holds experts "
                        f"0..{max(experts)} of {module!r} but not this one (an incomplete or damaged source)"
                    )
                    raise MoeCheckpointError(msg)
                shape = tuple(t.shape)
                first = shapes.setdefault(f"{proj}/{e // per_group if per_group else 0}", (shape, t.name))
                if shape != first[0]:
                    msg = (
                        f"{t.name} has shape {list(shape)} but {first[1]} has {list(first[0])}: the "
                        f"experts of {module!r} must all have the same shapes (a damaged source)"
                    )
                    raise MoeCheckpointError(msg)
        if per_group and check_mode(mode) == "quantize":
            groups_said = ", ".join(
                f"{g * per_group}..{(g + 1) * per_group - 1} of width {w}" for g, w in enumerate(widths)
            )
            msg = (
                f"{module}: --moe-experts quantize does not take ERNIE-4.5-VL's experts (one experts module "
                f"of text and vision experts, {groups_said}, which transformers splits into text_moe and "
                "vision_moe; no loader of 4-bit experts reads them): convert with --moe-experts keep (the "
                "default), which stock transformers + bitsandbytes loads"
            )
            raise MoeCheckpointError(msg)


def _glob_hit(globs: Sequence[str], *names: str) -> bool:
    return any(fnmatch.fnmatchcase(n, g) for g in globs for n in names if n)


def apply_moe_mode(
    selection: Any,
    tensors: Sequence[_TensorLike],
    mode: str,
    *,
    skip: Sequence[str] = (),
    include: Sequence[str] = (),
    config: Any = None,
) -> Any:
    """The selection with ``--moe-experts`` applied (``keep`` returns it unchanged, but for Llama 4).

    ``quantize`` moves every 2-D per-expert weight the user's globs allow into ``quantize`` and adds
    the router leaf names to ``skip_modules``. ``selection`` is converter.plan.selection.Selection (any
    frozen dataclass with ``quantize``, ``keep``, ``skip_modules``).

    Llama 4 (``config``): transformers builds its experts as per-expert nn.Linear for a pre-quantized
    checkpoint, so the selection quantizes them like any Linear; ``keep`` takes them out again and lists
    each experts module in ``skip_modules``, so that transformers leaves those layers nn.Linear.
    """
    mode = check_mode(mode)
    if mode == "keep" and is_moe(tensors) and is_llama4_layout((t.name for t in tensors), config):
        return _keep_llama4(selection)
    if mode == "keep" or not is_moe(tensors):
        return selection
    quantize = dict(selection.quantize)
    keep = dict(selection.keep)
    spec = _spec(transpose=False)
    fused, fused_keep = fused_layers(tensors)
    for t in tensors:
        if t.name in quantize:
            continue
        key = parse_expert_key(t.name)
        gpt_oss = GPT_OSS_EXPERT.match(t.name)
        if gpt_oss is not None and gpt_oss["kind"] == "bias":
            keep[t.name] = "bias (gpt-oss expert: 16-bit, as unsloth's per-expert Linear holds it)"
            continue
        if gpt_oss is not None:
            key = ExpertKey(gpt_oss["module"], int(gpt_oss["e"]), gpt_oss["proj"])
        module = t.name.removesuffix(".weight")
        globbed_out = _glob_hit(skip, t.name, module) or (include and not _glob_hit(include, t.name, module))
        if key is None and t.name not in fused:
            if t.name in fused_keep and not globbed_out:  # globbed out: the selection's reason stays
                keep[t.name] = fused_keep[t.name]
            continue
        if globbed_out:
            if gpt_oss is not None:  # not a model parameter to the selection: the glob is the reason
                from converter.plan.selection_facts import user_reason

                keep[t.name] = user_reason(skip, include, t.name, module) or "--skip/--include glob"
            continue  # the selection's own reason (a --skip/--include glob) stays
        if len(t.shape) != (2 if key is not None else 3) or t.dtype not in _QUANTIZABLE:
            keep[t.name] = f"expert weight of shape {list(t.shape)} and dtype {t.dtype} cannot be quantized"
            continue
        keep.pop(t.name, None)
        quantize[t.name] = spec if key is not None else _spec(transpose=fused[t.name].transpose)
    if not any(is_expert_weight(n) for n in quantize):  # no expert quantized: no router to skip either
        return replace(selection, keep=keep)  # (no_effect_note: the run is recorded as keep)
    routers = router_skip_entries(router_modules((t.name for t in tensors), quantize), quantize)
    skip_modules = sorted(set(selection.skip_modules) | routers)
    return replace(selection, quantize=quantize, keep=keep, skip_modules=skip_modules)


def router_skip_entries(routers: Mapping[str, str], quantized: Collection[str]) -> set[str]:
    """The ``llm_int8_skip_modules`` entries of the 16-bit ``routers`` (module -> leaf): each leaf
    (``gate``), as vLLM's bnb loader matches one dotted component, unless transformers' rule (a pattern
    also matches as a suffix: ``gate`` skips MiniMax's ``self_attn.output_gate``) would then skip a
    ``quantized`` weight's module; those routers are listed by their whole module names, which both
    match (vLLM as a prefix, transformers from the start, at a module boundary) and catch nothing else."""
    from converter.plan.selection_facts import should_convert_module

    modules = [n.removesuffix(".weight") for n in quantized]
    catches = {
        leaf: any(not should_convert_module(m, [leaf]) for m in modules) for leaf in set(routers.values())
    }
    return {module if catches[leaf] else leaf for module, leaf in routers.items()}


def globs_select_an_expert(names: Iterable[str], skip: Sequence[str], include: Sequence[str]) -> bool:
    """Whether ``--skip`` / ``--include`` leave some gpt-oss per-expert weight among ``names`` to quantize
    (apply_moe_mode's rule): if none, a conversion writes gpt-oss's fused experts as ``keep`` does."""
    for name in names:
        if _gpt_oss_weight(name):
            module = name.removesuffix(".weight")
            if not _glob_hit(skip, name, module) and (not include or _glob_hit(include, name, module)):
                return True
    return False


def _keep_llama4(selection: Any) -> Any:
    """``--moe-experts keep`` for Llama 4: its per-expert weights 16-bit, their experts modules skipped."""
    moved = {n: m["module"] for n in selection.quantize if (m := LLAMA4_EXPERT.match(n))}
    if not moved:
        return selection
    quantize = {k: v for k, v in selection.quantize.items() if k not in moved}
    reason = "routed MoE expert (--moe-experts keep: 16-bit, its experts module in llm_int8_skip_modules)"
    keep = {**selection.keep, **dict.fromkeys(moved, reason)}
    modules = set(moved.values())
    # also as the classes another Auto class builds name them: transformers matches an entry at the start
    # of a module's name (or as the suffix of a leaf), so AutoModelForCausalLM on a multimodal folder
    # (model.layers.…) and AutoModel's Llama4TextModel (layers.…) skip them too; vLLM matches the full
    # names and finds nothing under the others
    modules |= {m[i:] for m in modules for i in (m.find("model.layers."), m.find("layers.")) if i > 0}
    skip_modules = sorted(set(selection.skip_modules) | modules)
    return replace(selection, quantize=quantize, keep=keep, skip_modules=skip_modules)


def router_modules(names: Iterable[str], quantized: Collection[str]) -> dict[str, str]:
    """The 16-bit routers among the tensor ``names`` (module -> leaf name): a folder with quantized
    experts lists every leaf in ``llm_int8_skip_modules`` (``quantized``: the names written 4-bit)."""
    return {
        m["module"]: m["leaf"] or m["inner"]
        for name in names
        if (m := _ROUTER_KEY.match(name)) and name not in quantized
    }


def is_skipped_by_vllm(module: str, skip_modules: Sequence[str]) -> bool:
    """vLLM's ``is_layer_skipped_bnb``: a skip entry equal to one dotted component of ``module`` or to
    one of its prefixes (``"gate"`` and ``"model.layers.0.mlp.gate"`` skip ``model.layers.0.mlp.gate``)."""
    parts = module.split(".")
    prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
    return any(s in parts or s in prefixes for s in skip_modules)


def unskipped_routers(
    names: Iterable[str], quantized: Collection[str], skip_modules: Sequence[str]
) -> dict[str, str]:
    """The 16-bit routers (module -> leaf, sorted) of a folder with 4-bit experts that
    ``llm_int8_skip_modules`` does not skip, so that vLLM's bnb loader would take them for quantized
    layers; empty when no expert is quantized."""
    if not any(is_expert_weight(name) for name in quantized):
        return {}
    routers = router_modules(names, quantized)
    return {m: routers[m] for m in sorted(routers) if not is_skipped_by_vllm(m, skip_modules)}


def _spec(*, transpose: bool) -> Any:
    """Per-expert weights are stored [out, in] like nn.Linear and quantized as they are; fused 3-D ones
    in Hub orientation ([E, in, out]) are quantized transposed per expert (converter/plan/moe_fused.py)."""
    from converter.plan.selection import QuantizeSpec

    return QuantizeSpec(transpose=transpose)


@dataclass(frozen=True)
class MoeSummary:
    """What a folder holds in routed experts, and which loaders read it.

    Two kinds of count: ``experts_*`` count experts, one per (layer, expert index) pair, whatever the
    layout on disk (a fused 3-D tensor of E experts is E of them; an expert's gate, up and down weights
    are one); ``tensors_*`` count the routed-expert weight tensors (a per-expert 2-D weight per projection,
    or a fused 3-D one per layer and projection), as ``inspect``'s "Quantized" / "Kept" rows do."""

    tensors_quantized: int  # routed-expert weight records quantized
    tensors_kept: int  # routed-expert weight tensors left in 16 bit
    loaders: tuple[str, ...]
    not_loaders: tuple[str, ...]
    expert_types: tuple[str, ...] = ()  # quant types of the quantized experts (e.g. "nf4", "int8"), if known
    converted: bool = True  # False: no weight of the folder is quantized (a source checkpoint)
    fused: bool = False  # the quantized experts are fused 3-D records (one per layer and projection)
    experts_quantized: int = 0  # experts (layer, index) whose every routed weight is quantized
    #: experts none of whose routed weights is quantized (None: not known from the tensors' shapes, DBRX)
    experts_kept: int | None = 0
    experts_partly: int = 0  # experts with some routed weights quantized and others 16-bit
    #: experts stored in a layout quantize-model does not quantize (Granite, JetMoE, DBRX: other_experts),
    #: kept 16-bit: their first tensor named, and the count of the rest ("NAME and N more"); "" if none
    other: str = ""

    @property
    def layout(self) -> str:
        if not self.converted:
            return "experts not quantized (no weight is: a source checkpoint)"
        if self.other:
            how = "stored in a layout quantize-model does not quantize"
            return f"experts kept in 16 bit ({how}: {self.other})"
        if self.tensors_quantized and not self.tensors_kept:
            kind = "/".join(self.expert_types) or "4-bit"
            each = "fused 3-D" if self.fused else "per-expert"
            return f"experts quantized ({each} bnb {kind} records)"
        if self.tensors_quantized:
            return "experts partly quantized"
        return "experts kept in 16 bit"

    @property
    def counts(self) -> str:
        """The counts in words: ``8 experts quantized, 0 kept (24 expert weights quantized, 0 kept)``."""
        partly = f", {self.experts_partly} partly" if self.experts_partly else ""
        if self.experts_kept is None:  # DBRX's [E * I, H] experts: their count is in config.json only
            return f"{self.tensors_quantized} expert weights quantized, {self.tensors_kept} kept"
        return (
            f"{self.experts_quantized} experts quantized, {self.experts_kept} kept{partly} "
            f"({self.tensors_quantized} expert weights quantized, {self.tensors_kept} kept)"
        )

    def to_json(self) -> dict:
        return {
            "layout": self.layout,
            "experts_quantized": self.experts_quantized,
            "experts_kept": self.experts_kept,
            "experts_partly_quantized": self.experts_partly,
            "expert_tensors_quantized": self.tensors_quantized,
            "expert_tensors_kept": self.tensors_kept,
            "loaders": list(self.loaders),
            "not_loaders": list(self.not_loaders),
            # experts of a layout quantize-model does not quantize (16-bit): "NAME and N more", or null
            "unquantized_layout": self.other or None,
        }


def _experts_of(name: str, shapes: Mapping[str, Sequence[int]]) -> list[tuple[str, int]]:
    """The experts, as (experts module, index) pairs, whose weight the tensor ``name`` holds: one for a
    per-expert weight (any family's names), ``shape[0]`` for a fused 3-D tensor; none for other tensors."""
    if m := EXPERT_KEY.match(name):  # Llama 4's per-expert names too
        return [(m["module"], int(m["index"]))]
    if _gpt_oss_weight(name):
        m = GPT_OSS_EXPERT.match(name)
        return [(m["module"], int(m["e"]))]
    if m := FUSED_EXPERT_KEY.match(name):
        shape = shapes.get(name)
        if shape is None:
            msg = f"{name}: a fused experts tensor needs its shape to count its experts"
            raise ValueError(msg)
        return [(m["module"], e) for e in range(shape[0])] if len(shape) == 3 else []
    return []


def count_experts(
    quantized_names: Iterable[str], kept_names: Iterable[str], shapes: Mapping[str, Sequence[int]]
) -> tuple[int, int, int]:
    """(experts whose every routed weight is quantized, experts with none quantized, experts with some)
    among the tensors named; ``shapes``: the shape of each fused 3-D experts tensor (its first dimension
    is its number of experts; the quantized one's logical shape, not the packed one's)."""
    quantized = {pair for n in quantized_names for pair in _experts_of(n, shapes)}
    kept = {pair for n in kept_names for pair in _experts_of(n, shapes)}
    return len(quantized - kept), len(kept - quantized), len(quantized & kept)


def mixed_modules(quantized_names: Sequence[str], kept_names: Sequence[str]) -> list[str]:
    """Experts modules (checkpoint names) holding both 4-bit and 16-bit per-expert weights: load_quantized
    stacks a layer's experts into one 4-bit or one 16-bit module, so it cannot load such a layer."""
    quantized = {m["module"] for n in quantized_names if (m := _expert_match(n))}
    kept = {m["module"] for n in kept_names if (m := _expert_match(n))}
    return sorted(quantized & kept)


def _expert_match(name: str) -> re.Match[str] | None:
    m = EXPERT_KEY.match(name) or FUSED_EXPERT_KEY.match(name)
    if m is None and _gpt_oss_weight(name):  # gpt-oss's per-expert record (its 16-bit bias is no expert)
        m = GPT_OSS_EXPERT.match(name)
    return m


def mixed_advice(quantized_names: Sequence[str], kept_names: Sequence[str]) -> str | None:
    """The warning for a conversion that leaves some experts of a layer 16-bit and others 4-bit."""
    mixed = mixed_modules(quantized_names, kept_names)
    if not mixed or is_llama4_layout([*quantized_names, *kept_names]):
        return None  # Llama 4: every expert is its own Linear, quantized or not, in every loader
    return (
        f"{len(mixed)} MoE layer(s) keep some experts 16-bit and quantize the others (e.g. {mixed[0]!r}): "
        "quantize-model's load_quantized cannot load such a layer (it stacks a layer's experts into one "
        "4-bit or one 16-bit module) and vLLM needs every expert quantized; --skip or --include whole "
        "layers' experts (e.g. '*.layers.0.mlp.experts.*') to keep the folder loadable"
    )


def partial_block_experts(records: Sequence[tuple[str, Sequence[int], int]]) -> list[str]:
    """The per-expert weights among ``(name, shape, blocksize)`` that do not fill whole blocks: load_quantized
    keeps a layer's gate, up and down codes of an expert back to back and needs each to end on a block
    boundary (``I*H % blocksize == 0``; bitsandbytes' own records allow a partial last block). A fused 3-D
    record is sliced the same way: each expert's gate, up (half of ``gate_up_proj``'s rows) and down."""
    out = []
    for name, shape, blocksize in records:
        fused = FUSED_EXPERT_KEY.match(name)
        numel = (
            math.prod(shape[1:]) // (2 if fused["proj"] == "gate_up_proj" else 1)
            if fused
            else math.prod(shape)
        )
        if _expert_match(name) and blocksize and numel % blocksize:
            out.append(name)
    return out


def vllm_unreadable(expert_formats: Collection[tuple[str, str]]) -> str | None:
    """Why vLLM's pre-quantized bitsandbytes loader cannot read 4-bit experts of these ``(quant type,
    quant_storage)`` pairs (it decodes every expert as NF4 and allows uint8 storage only,
    reference/moe-4bit.md), or None."""
    types = sorted({t for t, _ in expert_formats if t != "nf4"})
    if types:
        return f"vLLM ({'/'.join(types)} experts: its fused-expert loader decodes every expert as NF4)"
    storages = sorted({s for _, s in expert_formats if s != "uint8"})
    if storages:
        return f"vLLM (quant_storage {'/'.join(storages)}: it allows uint8 only)"
    return None


def summarize(
    quantized_names: Sequence[str],
    kept_names: Sequence[str],
    partial_blocks: Sequence[str] = (),
    expert_formats: Collection[tuple[str, str]] = (),
    shapes: Mapping[str, Sequence[int]] | None = None,
    others: Sequence[_TensorLike] = (),
    model_type: str | None = None,
) -> MoeSummary | None:
    """The MoE summary of a folder from its quantized weight keys and kept tensor keys (None if dense);
    ``partial_blocks``: quantized expert weights that do not fill whole blocks (partial_block_experts);
    ``expert_formats``: the ``(quant type, quant_storage)`` pairs of the quantized experts, where known;
    ``shapes``: name -> shape of at least every fused 3-D experts tensor named (to count its experts);
    ``others``: the kept tensors that are experts of a layout quantize-model does not quantize
    (``other_experts`` of the kept tensors: Granite's, JetMoE's, DBRX's), summarized as kept 16-bit, as
    ``convert`` names them, where the folder holds no expert of another layout; ``model_type``: config.json's,
    where known (a model type transformers 4.x never had leaves 4.x out of the loaders)."""
    summary = _summary(quantized_names, kept_names, partial_blocks, expert_formats)
    if summary is not None and not in_transformers4(model_type):
        summary = _without_transformers4(summary, str(model_type))
    if summary is None and others:
        converted = bool(quantized_names)
        return MoeSummary(
            0,
            len(others),
            LOADERS_OTHER if converted else (),
            NOT_LOADERS_OTHER if converted else (NOT_CONVERTED,),
            converted=converted,
            experts_kept=_other_experts_count(others),
            other=_other_experts_named(others),
        )
    if summary is None:
        return None
    q, k, partly = count_experts(quantized_names, kept_names, shapes or {})
    return replace(summary, experts_quantized=q, experts_kept=k, experts_partly=partly)


def in_transformers4(model_type: str | None) -> bool:
    """Whether transformers 4.x has a model class for config.json's ``model_type`` (True when unknown)."""
    return not model_type or model_type in TRANSFORMERS4_MODEL_TYPES


def _without_transformers4(summary: MoeSummary, model_type: str) -> MoeSummary:
    """``summary`` for a model type transformers 4.x never had: 4.x leaves the loaders, and among the
    others it is named once, for that reason (instead of a 4.x-specific one)."""
    is_4x = re.compile(r"(stock )?transformers 4\.x\b").match
    if not any(is_4x(x) for x in (*summary.loaders, *summary.not_loaders)):
        return summary
    why = f"transformers 4.x (no {model_type} model class: the model type came in transformers 5.x)"
    loaders = tuple(x for x in summary.loaders if not is_4x(x))
    not_loaders = (*(x for x in summary.not_loaders if not is_4x(x)), why)
    return replace(summary, loaders=loaders, not_loaders=not_loaders)


def _summary(
    quantized_names: Sequence[str],
    kept_names: Sequence[str],
    partial_blocks: Sequence[str],
    expert_formats: Collection[tuple[str, str]],
) -> MoeSummary | None:
    if is_llama4_layout([*quantized_names, *kept_names]):
        return _summarize_llama4(quantized_names, kept_names, expert_formats)
    if any(_gpt_oss_weight(n) for n in [*quantized_names, *kept_names]):
        return _summarize_gpt_oss(quantized_names, kept_names, partial_blocks, expert_formats)
    summary = _summarize(quantized_names, kept_names, partial_blocks)
    if summary is not None and summary.tensors_quantized:
        summary = replace(summary, expert_types=tuple(sorted({t for t, _ in expert_formats})))
    if summary is not None and summary.tensors_quantized and any(t == "int8" for t, _ in expert_formats):
        return replace(summary, loaders=LOADERS_INT8, not_loaders=NOT_LOADERS_INT8)
    vllm = vllm_unreadable(expert_formats)
    if summary is None or vllm is None or LOADERS_QUANTIZED[1] not in summary.loaders:
        return summary
    loaders = tuple(x for x in summary.loaders if x != LOADERS_QUANTIZED[1])
    return replace(summary, loaders=loaders, not_loaders=(*summary.not_loaders, vllm))


def ungated(names: Iterable[str]) -> bool:
    """Whether the per-expert weights among ``names`` are of experts without a gate projection (every
    experts module's leaves are ``up_proj`` and ``down_proj``: NemotronH's)."""
    leaves: dict[str, set[str]] = {}
    for n in names:
        if key := parse_expert_key(n):
            leaves.setdefault(key.module, set()).add(key.proj)
    return bool(leaves) and all(v == _UNGATED_LEAVES for v in leaves.values())


def _summarize(
    quantized_names: Sequence[str], kept_names: Sequence[str], partial_blocks: Sequence[str]
) -> MoeSummary | None:
    q = sum(1 for n in quantized_names if EXPERT_KEY.match(n))
    k = sum(1 for n in kept_names if EXPERT_KEY.match(n) or FUSED_EXPERT_KEY.match(n))
    qf = sum(1 for n in quantized_names if FUSED_EXPERT_KEY.match(n))
    if not q and not k and not qf:
        return None
    if not quantized_names:  # a source checkpoint (16-bit, FP8): no pre-quantized bnb loader takes it
        return MoeSummary(0, k, (), (NOT_CONVERTED,), converted=False)
    if qf:
        return _summarize_fused(q + qf, k, quantized_names, kept_names, partial_blocks)
    if q:
        no_gate = ungated(quantized_names)
        every, not_every = (
            (LOADERS_UNGATED, NOT_LOADERS_UNGATED) if no_gate else (LOADERS_QUANTIZED, NOT_LOADERS_QUANTIZED)
        )
        not_loaders = not_every + (
            ("vLLM (some experts are not quantized: it needs all of them)",) if k and not no_gate else ()
        )
        if partial_blocks:
            reason = (
                f"quantize-model load_quantized ({partial_blocks[0]} does not fill whole blocks: "
                "convert with a --blocksize that divides each expert weight's size)"
            )
            loaders = every[1:] if not k else ()
            return MoeSummary(q, k, loaders, (*not_loaders, reason))
        if not k:
            return MoeSummary(q, k, every, not_loaders)
        mixed = mixed_modules(quantized_names, kept_names)
        if mixed:
            reason = f"quantize-model load_quantized ({mixed[0]} mixes 4-bit and 16-bit experts)"
            return MoeSummary(q, k, (), (*not_loaders, reason))
        return MoeSummary(q, k, every[:1], not_loaders)
    if zero_expert_modules(kept_names):  # LongCat-Flash: unsloth-zoo not checked with its zero experts
        return MoeSummary(0, k, LOADERS_ZERO_EXPERTS, NOT_LOADERS_KEPT)
    return MoeSummary(0, k, LOADERS_KEPT, NOT_LOADERS_KEPT)


def zero_expert_modules(names: Iterable[str]) -> list[str]:
    """Experts modules (checkpoint names) whose last experts have gate and up weights but no down weight
    while the others have all three: LongCat-Flash's zero (identity) experts as transformers'
    save_pretrained writes them up to 5.24 (``_zero_expert_rows``), which stock transformers 5.24 and
    load_quantized stack into ``LongcatFlashExperts`` (``gate_up_proj`` holds every expert, ``down_proj``
    the routed); under 5.25 and later, whose ``gate_up_proj`` holds the routed experts only, load_quantized
    leaves the zero experts' rows out (stock transformers refuses them)."""
    roles: dict[str, dict[int, set[str]]] = {}
    for n in names:
        if key := parse_expert_key(n):
            roles.setdefault(key.module, {}).setdefault(key.index, set()).add(PROJ_ROLE[key.proj])
    out = []
    for module, experts in roles.items():
        without = sorted(e for e, r in experts.items() if r == {"gate", "up"})
        whole = sorted(e for e, r in experts.items() if r == {"gate", "up", "down"})
        if without and whole and len(without) + len(whole) == len(experts) and whole[-1] < without[0]:
            out.append(module)
    return sorted(out)


def _summarize_llama4(
    quantized_names: Sequence[str], kept_names: Sequence[str], expert_formats: Collection[tuple[str, str]]
) -> MoeSummary:
    """Llama 4's per-expert weights: stock transformers + bitsandbytes builds each as its own Linear
    (quantized or skipped), and so does load_quantized, so any mix of 4-bit and 16-bit experts loads."""
    q = sum(1 for n in quantized_names if LLAMA4_EXPERT.match(n))
    k = sum(1 for n in kept_names if LLAMA4_EXPERT.match(n))
    if not quantized_names:
        return MoeSummary(0, k, (), (NOT_CONVERTED,), converted=False)
    if any(t == "int8" for t, _ in expert_formats) and q:
        return MoeSummary(q, k, LOADERS_INT8, NOT_LOADERS_INT8[2:], ("int8",))
    if q:
        types = tuple(sorted({t for t, _ in expert_formats}))
        return MoeSummary(q, k, LOADERS_LLAMA4_QUANTIZED, (), types)
    return MoeSummary(0, k, LOADERS_LLAMA4_KEPT, NOT_LOADERS_KEPT)


def _summarize_gpt_oss(
    quantized_names: Sequence[str],
    kept_names: Sequence[str],
    partial_blocks: Sequence[str],
    expert_formats: Collection[tuple[str, str]],
) -> MoeSummary:
    """gpt-oss's per-expert records (unsloth's names): load_quantized and unsloth read them."""
    q = sum(1 for n in quantized_names if _gpt_oss_weight(n))
    k = sum(1 for n in kept_names if _gpt_oss_weight(n))
    types = tuple(sorted({t for t, _ in expert_formats}))
    if not q:
        return MoeSummary(0, k, LOADERS_KEPT[1:2], NOT_LOADERS_GPT_OSS)
    mixed = mixed_modules(quantized_names, kept_names)
    if partial_blocks or mixed:
        what = f"{partial_blocks[0]} does not fill whole blocks" if partial_blocks else ""
        what = what or f"{mixed[0]} mixes 4-bit and 16-bit experts"
        reason = f"quantize-model load_quantized ({what})"
        return MoeSummary(q, k, LOADERS_GPT_OSS[1:] if not k else (), (*NOT_LOADERS_GPT_OSS, reason), types)
    if k:  # whole layers' experts 16-bit (--skip): load_quantized stacks them as transformers holds them
        return MoeSummary(q, k, LOADERS_GPT_OSS[:1], NOT_LOADERS_GPT_OSS, types)
    return MoeSummary(q, k, LOADERS_GPT_OSS, NOT_LOADERS_GPT_OSS, types)


def _summarize_fused(
    q: int, k: int, quantized_names: Sequence[str], kept_names: Sequence[str], partial_blocks: Sequence[str]
) -> MoeSummary:
    """A folder with fused 3-D expert records: load_quantized and unsloth-zoo read them, nothing else."""
    if partial_blocks:
        reason = (
            f"quantize-model load_quantized ({partial_blocks[0]} does not fill whole blocks per expert: "
            "convert with a --blocksize that divides each expert weight's size)"
        )
        return MoeSummary(q, k, LOADERS_FUSED[1:], (*NOT_LOADERS_FUSED, reason), fused=True)
    mixed = mixed_modules(quantized_names, kept_names)
    if mixed:
        reason = f"quantize-model load_quantized ({mixed[0]} mixes 4-bit and 16-bit experts)"
        return MoeSummary(q, k, (), (*NOT_LOADERS_FUSED, reason), fused=True)
    return MoeSummary(q, k, LOADERS_FUSED, NOT_LOADERS_FUSED, fused=True)


def no_effect_note(tensors: Sequence[_TensorLike], mode: str, quantized: Sequence[str]) -> str | None:
    """The note for ``--moe-experts quantize`` when it quantizes no expert weight (a dense model, fused
    3-D experts only, or globs leaving every expert out): the conversion is the one with ``keep``, so
    the caller records ``keep``, and no folder claims quantized experts it does not hold."""
    if check_mode(mode) != "quantize" or any(is_expert_weight(n) for n in quantized):
        return None
    if is_moe(tensors):
        why = "no expert weight was quantized (--skip/--include left every expert out)"
    else:
        others = other_experts(tensors, quantized)
        why = _other_experts_what(others) if others else "the checkpoint has no routed MoE experts"
    return f"--moe-experts quantize has no effect: {why}; the folder is the one --moe-experts keep writes"


def _per_expert_readers(names: Sequence[str], model_type: str | None) -> str:
    """Who reads these experts as per-expert 4-bit records, in words (reference/moe-4bit.md)."""
    if ungated(names):  # NemotronH's: load_quantized runs them (loader/moe_ungated.py)
        return (
            "quantize-model's load_quantized (no other loader of 4-bit experts is known to run experts "
            "without a gate)"
        )
    ours = "quantize-model's load_quantized, vLLM (pre-quantized bnb, TP=1)"
    return f"{ours}, transformers 4.x and unsloth" if in_transformers4(model_type) else f"{ours} and unsloth"


def keep_advice(
    tensors: Sequence[_TensorLike],
    mode: str,
    threshold: float = 0.5,
    *,
    quant_type: str = "nf4",
    quantizes_experts: bool = True,
    quantized: Collection[str] = (),
    model_type: str | None = None,
) -> str | None:
    """The one warning for ``--moe-experts keep`` when routed experts hold most of the parameters (biased
    fused 3-D experts, gpt-oss's, an advice naming the per-expert records' loaders; other fused ones an
    advice naming the fused record's loaders; experts of a layout quantize-model does not quantize, not
    among the selection's ``quantized`` weights, an advice naming them). ``quantizes_experts``:
    whether ``quant_type`` can quantize experts (``--moe-experts quantize``); if not (int8), the advice
    names the 4-bit types that can; ``model_type``: config.json's (transformers 4.x is named among the
    per-expert records' loaders only for a model type it has)."""
    if check_mode(mode) != "keep":
        return None
    experts, total = expert_share(tensors)
    others = other_experts(tensors, quantized) if not experts else []
    other_share = sum(_numel(t) for t in others) / total if others else 0.0
    if other_share > threshold:
        return (
            f"routed MoE experts hold {100 * other_share:.1f}% of the parameters and the folder barely "
            f"shrinks: {_other_experts_what(others)} (--moe-experts quantize too); the folder loads with "
            "stock transformers + bitsandbytes and quantize-model's load_quantized"
        )
    if not total or experts / total <= threshold:
        return None
    if is_llama4_layout(t.name for t in tensors):
        how = (
            "--moe-experts quantize stores every expert in 4 bit"
            if quantizes_experts
            else f"with --quant-type {quant_type} they cannot be quantized; --quant-type nf4 --moe-experts "
            "quantize stores every expert in 4 bit"
        )
        return (
            f"routed MoE experts hold {100 * experts / total:.1f}% of the parameters and stay 16-bit with "
            "--moe-experts keep (the default): the folder loads with stock transformers + bitsandbytes but "
            f"barely shrinks. {how}: Llama 4's experts are written per expert (as transformers loads a "
            "pre-quantized Llama 4), so that folder loads with stock transformers 5.x + bitsandbytes and "
            "quantize-model's load_quantized"
        )
    fused, _ = fused_layers(tensors)
    quantizable = sum(_numel(t) for t in tensors if EXPERT_KEY.match(t.name) or t.name in fused)
    if quantizable / total <= threshold:  # mostly biased fused experts (gpt-oss)
        how = (
            "--moe-experts quantize writes them as per-expert 4-bit records under unsloth's names "
            "(experts.gate_up_projs.<e> / down_projs.<e>, biases 16-bit)"
            if quantizes_experts
            else f"with --quant-type {quant_type} they cannot be quantized; --quant-type nf4 --moe-experts "
            "quantize writes them as per-expert 4-bit records under unsloth's names"
        )
        return (
            f"routed MoE experts hold {100 * experts / total:.1f}% of the parameters and stay 16-bit with "
            "--moe-experts keep (the default): they are stored fused on disk with biases (one 3-D tensor "
            f"per layer and projection, as gpt-oss ships them) and the folder barely shrinks. {how}, "
            "which load with quantize-model's load_quantized and unsloth, but not with stock "
            "transformers 5.x nor vLLM"
        )
    if fused and not quantizes_experts:
        return (
            f"routed MoE experts hold {100 * experts / total:.1f}% of the parameters and stay 16-bit with "
            f"--quant-type {quant_type}: the folder barely shrinks. Fused 3-D experts are quantized only "
            "with the 4-bit types: --quant-type nf4 --moe-experts quantize"
        )
    if fused:
        return (
            f"routed MoE experts hold {100 * experts / total:.1f}% of the parameters and stay 16-bit with "
            "--moe-experts keep (the default): the folder loads with stock transformers 5.x + bitsandbytes "
            "but barely shrinks. They are stored fused on disk (one 3-D tensor per layer and projection, as "
            "Qwen3-VL-MoE ships them); --moe-experts quantize stores each as one fused 3-D 4-bit record, "
            "which loads with quantize-model's load_quantized and unsloth-zoo, but not with stock "
            "transformers 5.x nor vLLM"
        )
    readers = _per_expert_readers([t.name for t in tensors], model_type)
    if not quantizes_experts:
        return (
            f"routed MoE experts hold {100 * experts / total:.1f}% of the parameters and stay 16-bit with "
            f"--quant-type {quant_type}: the folder loads with stock transformers 5.x + bitsandbytes but "
            "barely shrinks. Experts are quantized only with the 4-bit types: --quant-type nf4 --moe-experts "
            f"quantize (or fp4) stores every expert in 4 bit; that folder loads with {readers}, but not "
            "with stock transformers 5.x"
        )
    return (
        f"routed MoE experts hold {100 * experts / total:.1f}% of the parameters and stay 16-bit with "
        "--moe-experts keep (the default): the folder loads with stock transformers 5.x + bitsandbytes but "
        "barely shrinks. --moe-experts quantize stores every expert in 4 bit; that folder loads with "
        f"{readers}, but not with stock transformers 5.x"
    )
