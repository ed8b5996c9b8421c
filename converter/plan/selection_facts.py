"""What transformers' selection rule knows about a model, as plain data, and the decision made from it.

``converter.plan.selection`` decides which weights to quantize from the model transformers would build
(a meta skeleton). Everything that decision reads from the skeleton is gathered here once per model
into ``ModelFacts`` (JSON-serialisable, no torch); ``decide`` then applies the per-run inputs (the
checkpoint's dtypes and shapes, --skip, --include) exactly as the live rule does. The live rule, the
per-user cache and the shipped table (``converter.plan.selection_table``) all go through ``decide``, so the
three cannot drift apart: they differ only in where the facts come from.

Facts per checkpoint key (``KeyFacts``):

- ``reason``: a fixed reason the key is never quantized whatever the run (bias, buffer, not an
  nn.Linear, router, output embedding, tied weight, _keep_in_fp32_modules, last module, fused MoE
  experts, not a parameter...). None: a quantizable linear weight (a *candidate*).
- for a candidate: its module in the model (``module``, matched by --skip/--include globs besides
  the checkpoint spelling), ``transpose`` (GPT-2 Conv1D), the model's ``shape`` (None: unchecked, see
  selection_table), and ``late``, a reason that applies only once every other check passed (its
  quantization state would be renamed apart from it on load).
- ``linear``: the key is the weight of an nn.Linear/Conv1D module (for llm_int8_skip_modules).
- ``fp32``: the key is in ``_keep_in_fp32_modules``: transformers keeps it float32 when the model
  dtype is float16 (and only then).
- ``fp32_strict``: the key is in ``_keep_in_fp32_modules_strict``: float32 when the model dtype is
  float16 or bfloat16.
- ``tied``: the checkpoint key of the tensor transformers ties this one to (``all_tied_weights_keys``,
  this key its target: a tied lm_head's source is the input embedding). When the checkpoint holds both
  with equal values, ``save_pretrained`` writes the source only.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from typing import Any, Protocol

from converter.errors import InputError

#: Why a subclass of nn.Linear stays 16-bit: transformers + bitsandbytes convert only nn.Linear itself.
SUBCLASS_REASON = "a subclass of nn.Linear, which transformers + bitsandbytes do not quantize"


#: nn.Linear modules whose weight a model multiplies by itself instead of calling the layer, by (class of
#: the parent module, leaf name): a 4-bit or int8 weight there fails in every loader (transformers +
#: bitsandbytes too: "Expected size for first two dimensions of batch2 tensor"), so they stay 16-bit.
#: transformers 5.x's MambaMixer computes ``self.dt_proj.weight @ time_step`` whatever the config, WavLM's
#: attention hands its projections' weights to ``F.multi_head_attention_forward``
#: (FalconMamba and Jamba branch on ``config._is_quantized`` and call the layer: quantized as usual).
#: The sparse-attention indexers below (and Inkling2-Loop's message gate) call the layer on
#: ``x.to(self.<leaf>.weight.dtype)``: a 4-bit weight (uint8 storage) truncates the input to uint8 and
#: the forward silently computes garbage in both loaders, an int8 one fails in both. Their models list
#: the layer in ``_keep_in_fp32_modules_strict`` only, which transformers + bitsandbytes does not exclude
#: from conversion (DeepSeek-V3.2, GLM-MoE-DSA, A.X-K2 and Mistral-Large-4 list it in
#: ``_keep_in_fp32_modules``: kept 16-bit by transformers' rule already).
_MHA = "multi_head_attention_forward"
READ_DIRECTLY = {
    ("MambaMixer", "dt_proj"): "read directly (MambaMixer multiplies by dt_proj.weight itself)",
    **{
        ("WavLMAttention", leaf): f"read directly (WavLMAttention passes {leaf}.weight to F.{_MHA})"
        for leaf in ("q_proj", "k_proj", "v_proj", "out_proj")
    },
    **{
        (cls, leaf): f"read directly ({cls} casts its input to {leaf}.weight.dtype)"
        for cls, leaf in (
            ("HYV4Indexer", "weights_proj"),
            ("HYV4VLIndexer", "weights_proj"),
            ("Dots3NoteTextIndexer", "weights_proj"),
            ("Glm5NextTextIndexer", "weights_proj"),
            ("Inkling2LoopMessageGate", "down_proj"),
            # the same cast before a projection, input layer or head (sweep48a): a 4-bit weight truncates
            # the input to uint8 (LongT5 and Kosmos-2.5 skip the cast for int8 weights only), an int8
            # one fails; none of these models lists the layer in _keep_in_fp32_modules (T5 does: its wo)
            ("GraniteSpeech5Encoder", "input_linear"),
            ("Ernie4_5_VLMoePatchEmbed", "proj"),
            ("Cosmos3EdgeVisionEmbeddings", "patch_embedding"),
            ("Inkling2VisionEmbeddings", "patch_embedding"),  # Inkling2's vision model casts pixel_values
            ("JevForDecision", "proj"),
            ("ColPaliForRetrieval", "embedding_proj_layer"),
            ("ColQwen2ForRetrieval", "embedding_proj_layer"),
            ("ColModernVBertForRetrieval", "embedding_proj_layer"),
            ("Blip2TextModelWithProjection", "text_projection"),
            ("Blip2VisionModelWithProjection", "vision_projection"),
            ("Blip2ForImageTextRetrieval", "text_projection"),
            ("Blip2ForImageTextRetrieval", "vision_projection"),
            ("Blip2ForImageTextRetrieval", "itm_head"),
            ("GradiumPhononTTSModel", "audio_prompt_proj"),
            ("GradiumPhononTTSModel", "audio_latent_proj"),
            ("LongT5DenseActDense", "wo"),
            ("Kosmos2_5VisionMlp", "wo"),
            ("EsmFold2AtomEncoder", "atom_linear"),
            ("EsmFold2DiffusionConditioning", "pair_proj"),
            ("EsmFold2DiffusionConditioning", "noise_proj"),
            ("EsmFold2DiffusionModule", "coords_linear"),
            ("EsmFold2MSAEncoder", "embed"),
            ("EsmFold2InputEmbedder", "token_bonds"),
        )
    },
    # MobileBERT's MLM head multiplies by torch.cat([decoder.weight.t(), dense.weight]): a quantized
    # dense fails in both loaders (transformers + bitsandbytes too: "Sizes of tensors must match")
    ("MobileBertLMPredictionHead", "dense"): (
        "read directly (MobileBertLMPredictionHead concatenates dense.weight into its output matrix)"
    ),
    # LayoutLMv2/v3's encoders index their relative-position bias tables' weights (rel_pos_bias.weight[...])
    **{
        (cls, leaf): f"read directly ({cls} indexes {leaf}.weight)"
        for cls in ("LayoutLMv2Encoder", "LayoutLMv3Encoder")
        for leaf in ("rel_pos_bias", "rel_pos_x_bias", "rel_pos_y_bias")
    },
    # these cast the pair states (also the folding trunk's input) to the head's dtype
    **{
        (cls, leaf): f"read directly ({cls} casts its pair states to {leaf}.weight.dtype)"
        for cls, leaf in (("EsmFold2ConfidenceHead", "pae_head"), ("EsmFold2Model", "distogram_head"))
    },
}


#: A module's class casting an input to a descendant's weight dtype: ``x.to(self.<leaf>.weight.dtype)``,
#: ``.to(dtype=self.<leaf>.weight.dtype)`` or ``target_dtype = self.<leaf>.weight.dtype`` first; the path
#: may go down more than one module (Ergo's decoder layer: ``self.self_attn.o_proj.weight.dtype``).
_CASTS = (
    re.compile(r"\.to\(\s*(?:dtype\s*=\s*)?self\.(\w+(?:\.\w+)*)\.weight\.dtype\s*\)"),
    re.compile(r"\b\w+\s*=\s*self\.(\w+(?:\.\w+)*)\.weight\.dtype\b"),
)


@cache
def _cast_leaves(cls: type) -> frozenset[str]:
    """The descendants (paths from ``cls``'s module: ``patch_embedding``, ``self_attn.o_proj``) whose
    weight's dtype ``cls``'s own code casts an input to (SigLIP2's ``patch_embedding``, Switch
    Transformers' ``wo``, Ergo's decoder layer, which casts its attention and MLP inputs to
    ``self_attn.o_proj.weight.dtype``): empty where its source cannot be read, or where it handles
    quantized weights itself (names ``_is_quantized`` or ``torch.uint8``: GPT-Neo's and Falcon's
    flash-attention casts, NLLB-MoE's ``fc2`` guard)."""
    import inspect

    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return frozenset()
    if "_is_quantized" in source or "torch.uint8" in source:
        return frozenset()
    return frozenset(leaf for pattern in _CASTS for leaf in pattern.findall(source))


def read_directly(name: str, modules: Mapping[str, Any]) -> str | None:
    """Why linear module ``name`` stays 16-bit because its parent reads its weight (READ_DIRECTLY), or
    casts its input to the weight's dtype (found in the parent class's source, as the table's entries:
    a 4-bit weight, uint8 storage, truncates the input to uint8 in every loader, silently; Switch
    Transformers' and SigLIP2's casts give garbage logits in transformers + bitsandbytes too)."""
    parent, _, leaf = name.rpartition(".")
    known = READ_DIRECTLY.get((type(modules.get(parent)).__name__, leaf))
    if known is not None:
        return known
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):  # the parent, then each ancestor up to the model
        owner = modules.get(".".join(parts[:i]))
        path = ".".join(parts[i:])
        if owner is not None and path in _cast_leaves(type(owner)):
            return f"read directly ({type(owner).__name__} casts its input to {path}.weight.dtype)"
    return None


def called_through_a_list(modules: Mapping[str, Any]) -> dict[str, str]:
    """Linear modules a parent also holds in a plain Python list or tuple attribute and calls from there
    (Mask2Former's / MaskFormer's ``PredictionBlock.layers = [nn.Linear(...), activation]``, registered
    with ``add_module`` besides): quantizing replaces the registered module, the list keeps calling the
    original, which no loader fills (transformers + bitsandbytes' forward fails on its meta weight, ours
    likewise), so they stay 16-bit and load in place. By module name: the reason."""
    from torch import nn

    name_of = {id(m): n for n, m in modules.items()}
    out: dict[str, str] = {}
    for owner in modules.values():
        for attr, value in vars(owner).items():
            if attr.startswith("_") or not isinstance(value, (list, tuple)):
                continue
            for item in value:
                if isinstance(item, nn.Linear) and id(item) in name_of:
                    out[name_of[id(item)]] = (
                        f"called through a plain list ({type(owner).__name__}.{attr}), "
                        "which a replaced layer does not reach"
                    )
    return out


class SelectionError(InputError):
    """The tensors to quantize cannot be decided for this checkpoint."""


class TensorLike(Protocol):
    name: str
    dtype: str
    shape: tuple[int, ...]


#: dtypes a weight must have to be quantized (the kernels take f32, f16 and bf16).
QUANTIZABLE_DTYPES = frozenset({"F32", "F16", "BF16"})


@dataclass(frozen=True)
class KeyFacts:
    reason: str | None = None
    module: str = ""
    transpose: bool = False
    late: str | None = None
    shape: tuple[int, ...] | None = None
    linear: bool = False
    fp32: bool = False
    fp32_strict: bool = False
    tied: str = ""

    def to_json(self) -> dict:
        return {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in asdict(self).items()
            if v not in (None, "", False)
        }

    @classmethod
    def from_json(cls, d: dict) -> KeyFacts:
        shape = d.get("shape")
        return cls(
            reason=d.get("reason"),
            module=d.get("module", ""),
            transpose=bool(d.get("transpose", False)),
            late=d.get("late"),
            shape=tuple(shape) if shape is not None else None,
            linear=bool(d.get("linear", False)),
            fp32=bool(d.get("fp32", False)),
            fp32_strict=bool(d.get("fp32_strict", False)),
            tied=str(d.get("tied", "")),
        )


@dataclass
class ModelFacts:
    """The model-side inputs of the selection rule for one model class and config."""

    cls_name: str
    prefix: str  # base_model_prefix ("" when none)
    has_base: bool  # the class wraps a base model under ``prefix``
    keys: dict[str, KeyFacts]
    #: nn.Linear/Conv1D modules no checkpoint key reaches (a tied lm_head): still in the skip list
    extra_linear: list[str] = field(default_factory=list)
    #: transformers' default skip names that are modules of the model (head, tied, last module)
    defaults: list[str] = field(default_factory=list)
    keep_in_fp32: list[str] = field(default_factory=list)  # the class's _keep_in_fp32_modules
    #: transformers' should_convert_module behaviour (MATCHERS); None: neither, only the live rule
    #: can build the skip list (such facts are never cached)
    matcher: str | None = "boundary"

    def to_json(self) -> dict:
        return {
            "cls_name": self.cls_name,
            "prefix": self.prefix,
            "has_base": self.has_base,
            "keys": {k: v.to_json() for k, v in self.keys.items()},
            "extra_linear": list(self.extra_linear),
            "defaults": list(self.defaults),
            "keep_in_fp32": list(self.keep_in_fp32),
            "matcher": self.matcher,
        }

    @classmethod
    def from_json(cls, d: dict) -> ModelFacts:
        return cls(
            cls_name=d["cls_name"],
            prefix=d["prefix"],
            has_base=bool(d["has_base"]),
            keys={k: KeyFacts.from_json(v) for k, v in d["keys"].items()},
            extra_linear=list(d.get("extra_linear", ())),
            defaults=list(d.get("defaults", ())),
            keep_in_fp32=list(d.get("keep_in_fp32", ())),
            matcher=d.get("matcher", "boundary"),
        )


# ---------------------------------------------------------------------------------------------
# transformers' own matchers, without importing transformers


def should_convert_module(full_name: str, patterns: Sequence[str] | None) -> bool:
    """transformers.quantizers.quantizers_utils.should_convert_module of transformers >= 5.2x, verbatim
    in behaviour: a pattern matches at a module boundary ("layers.1" is not "layers.11")."""
    if patterns is None:
        return True
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return not any(
        re.match(rf"(?:{key}){boundary}", full_name) or full_name.endswith(key) for key in patterns
    )


def should_convert_module_prefix(full_name: str, patterns: Sequence[str] | None) -> bool:
    """The same function in earlier transformers 5 releases (5.17): a plain prefix match, so
    "layers.1" also catches "layers.11"."""
    if patterns is None:
        return True
    return not any(
        re.match(f"{key}\\.", full_name) or re.match(f"{key}", full_name) or full_name.endswith(key)
        for key in patterns
    )


#: transformers' matcher per behaviour; ModelFacts.matcher names the one of the version that made them.
MATCHERS = {"boundary": should_convert_module, "prefix": should_convert_module_prefix}
_PROBES = (
    ("model.layers.11.mlp", ["model.layers.1"]),
    ("model.layers.1.mlp", ["model.layers.1"]),
    ("layers.1.mlp.gate_proj", ["layers.1.mlp.gate"]),
    ("lm_head", ["lm_head"]),
    ("encoder.block.0.wo", ["wo"]),
    ("a.b", ["c"]),
)


def matcher_of(hf_should_convert: Any) -> str | None:
    """Which of MATCHERS behaves as transformers' own function on the probes (None: neither)."""
    for name, fn in MATCHERS.items():
        if all(fn(n, list(p)) == hf_should_convert(n, list(p)) for n, p in _PROBES):
            return name
    return None


def module_of(key: str) -> str:
    """Module name of a checkpoint key ("a.b.weight" -> "a.b")."""
    return key.rpartition(".")[0]


def _glob_hit(globs: Sequence[str], names: Sequence[str]) -> str | None:
    for g in globs:
        if any(n and fnmatch.fnmatchcase(n, g) for n in names):
            return g
    return None


def user_reason(skip: Sequence[str], include: Sequence[str], *names: str) -> str | None:
    """Reason the user's --skip / --include leave a weight unquantized, or None."""
    g = _glob_hit(skip, names)
    if g is not None:
        return f"--skip glob '{g}'"
    if include and _glob_hit(include, names) is None:
        return "not matched by --include"
    return None


def _spellings(name: str) -> tuple[str, ...]:
    """``name`` and ``name`` without its first component (the base-model prefix a model's own module
    names may lack or add: ``bert.encoder...`` / ``encoder...``)."""
    return (name, name.split(".", 1)[1]) if "." in name else (name,)


def _glob_spellings(glob: str) -> tuple[str, ...]:
    """``glob`` and, when its first component is a plain name (a base-model prefix the checkpoint's
    keys may lack: ``bert.pooler.*``), ``glob`` without it; never a wildcard's (``*.pooler.*`` is not
    ``pooler.*``: the selection does not strip it), nor a plain name's followed by wildcards alone
    (``lm_head.*`` is not ``*``, which would match every name: it was the "did you mean" of ``lm_head``
    in a checkpoint with no lm_head, a tied head, though it matches nothing there either)."""
    head, dot, rest = glob.partition(".")
    named = rest.strip("*?.") != ""
    return (glob, rest) if dot and named and not any(c in head for c in "*?[") else (glob,)


def unmatched_globs(globs: Sequence[str], tensor_names: Sequence[str]) -> list[tuple[str, str, str | None]]:
    """The globs of ``globs`` that match no name the selection tries (each tensor name and its own
    module, in either spelling: with or without the base-model prefix), each with an example name
    (a module whose last component is the glob, else the first tensor) and a glob that does match
    (``down_proj`` -> ``*.down_proj``, ``model.layers.0`` -> ``model.layers.0.*``), else None.

    fnmatch matches whole names, so ``--skip down_proj`` (as transformers' ``llm_int8_skip_modules``
    is written) keeps nothing: the conversion warns instead of quantizing everything silently. So does a
    glob naming only a parent module (``--skip model.layers.0``, ``--skip pooler``) or a wildcard
    prefix the names lack (``--skip '*.pooler.*'`` of ``pooler.dense.weight``): the selection matches a
    weight's own names, never its parents', and these kept nothing without a word."""
    names: set[str] = set()  # what user_reason is given for a tensor: its name and its module
    modules: dict[str, str] = {}  # a component -> the first module name it ends
    for full in tensor_names:
        for own in (full, module_of(full)):
            if own:
                names.update(_spellings(own))
        parts = full.split(".")
        for i in range(1, len(parts) + 1):
            modules.setdefault(parts[i - 1], ".".join(parts[:i]))

    def hits(glob: str) -> bool:
        return any(fnmatch.fnmatchcase(n, v) for v in _glob_spellings(glob) for n in names)

    out = []
    for g in globs:
        if hits(g):
            continue
        tries = [f"*.{g}", f"{g}.*", f"*.{g}.*"]
        if g.startswith("*."):
            tries.insert(0, g[2:])
        better = next((t for t in tries if hits(t)), None)
        example = modules.get(g)
        if example not in names:  # a parent module ('pooler'): one the selection matches, under it
            under = [m for n in tensor_names if better and fnmatch.fnmatchcase(m := module_of(n), better)]
            example = under[0] if under else (tensor_names[0] if tensor_names else "")
        out.append((g, example, better))
    return out


def data_reason(t: TensorLike) -> str | None:
    """Reason a linear weight cannot be quantized by its dtype or shape, or None."""
    if t.dtype not in QUANTIZABLE_DTYPES:
        return f"dtype {t.dtype} is not float32/float16/bfloat16"
    if len(t.shape) != 2:
        return f"{len(t.shape)}-D tensor (only 2-D linear weights are quantized)"
    if 0 in t.shape:
        return "empty tensor"
    return None


def strip_prefix(name: str, prefixes: Sequence[str]) -> str:
    for p in prefixes:
        if p and name.startswith(p + "."):
            return name[len(p) + 1 :]
    return name


# ---------------------------------------------------------------------------------------------
# the decision


@dataclass
class Decision:
    quantize: dict[str, bool]  # key -> transpose
    keep: dict[str, str]
    skip_modules: list[str]
    keep_fp32: set[str]
    keep_fp32_strict: set[str] = field(default_factory=set)
    tied: dict[str, str] = field(default_factory=dict)  # target key -> source key, both in the checkpoint


def _spelled(key: str, names: set[str], prefix: str) -> str | None:
    """``key`` as the checkpoint spells it, with or without the base-model prefix (transformers reads
    both; facts gathered over both spellings name one of them); None when it is not there."""
    if not key:
        return None
    candidates = [key]
    if prefix:
        candidates += [f"{prefix}.{key}", key.removeprefix(f"{prefix}.")]
    return next((c for c in candidates if c in names), None)


def decide(
    facts: ModelFacts,
    tensors: Sequence[TensorLike],
    *,
    skip: Sequence[str],
    include: Sequence[str],
    matcher: Any = None,
) -> Decision:
    """Every tensor quantized or kept with its reason, and llm_int8_skip_modules: the live rule's steps.

    Every key of ``tensors`` must be in ``facts.keys`` (the caller checks).
    """
    quantize: dict[str, bool] = {}
    keep: dict[str, str] = {}
    keep_fp32: set[str] = set()
    keep_fp32_strict: set[str] = set()
    quantized_modules: set[str] = set()
    linear: set[str] = set(facts.extra_linear)
    names = {t.name for t in tensors}
    tied = {t.name: src for t in tensors if (src := _spelled(facts.keys[t.name].tied, names, facts.prefix))}
    for t in tensors:
        kf = facts.keys[t.name]
        if kf.linear:
            linear.add(kf.module)
        if kf.fp32:
            keep_fp32.add(t.name)
        if kf.fp32_strict:
            keep_fp32_strict.add(t.name)
        reason = kf.reason
        if reason is None:
            reason = user_reason(skip, include, t.name, module_of(t.name), kf.module) or data_reason(t)
            if reason is None and kf.shape is not None and tuple(t.shape) != kf.shape:
                reason = f"shape {list(t.shape)} differs from {facts.cls_name}'s {list(kf.shape)}"
            if reason is None:
                reason = kf.late
            if reason is None:
                quantize[t.name] = kf.transpose
                quantized_modules.add(kf.module)
        if reason is not None:
            keep[t.name] = reason
    not_quantized = {n for n in linear if n not in quantized_modules}
    names = sorted(not_quantized | set(facts.defaults))
    skip_modules = skip_list(facts, linear, quantized_modules, names, matcher)
    return Decision(
        quantize, keep, skip_modules, keep_fp32 - set(quantize), keep_fp32_strict - set(quantize), tied
    )


def skip_list(
    facts: ModelFacts, linear: set[str], quantized: set[str], names: list[str], matcher: Any = None
) -> list[str]:
    """llm_int8_skip_modules for ``names``, checked with transformers' matcher.

    Preferred spelling: without the base-model prefix ("layers.0.mlp.down_proj"), which transformers
    matches both as a suffix of "model.layers.0.mlp.down_proj" (the ForCausalLM class) and as a prefix
    of the bare base model's names, so AutoModel loads the folder right too. Falls back to the full
    names if that spelling would catch a module we quantized.
    """
    prefix, keep_in_fp32 = facts.prefix, list(facts.keep_in_fp32)
    convert = matcher or MATCHERS[facts.matcher or "boundary"]

    def converts(candidates: set[str], patterns: list[str]) -> set[str]:
        return {n for n in candidates if convert(n, patterns + keep_in_fp32)}

    stripped = sorted({strip_prefix(n, (prefix,)) for n in names}) if facts.has_base else names
    ok = converts(linear, stripped) == quantized
    if ok and facts.has_base:
        base_linear = {n[len(prefix) + 1 :] for n in linear if n.startswith(prefix + ".")}
        base_quant = {n[len(prefix) + 1 :] for n in quantized if n.startswith(prefix + ".")}
        ok = converts(base_linear, stripped) == base_quant
    chosen = stripped if ok else names if converts(linear, names) == quantized else None
    if chosen is not None:
        # a head under a wrapper (language_model.lm_head) also as "lm_head": transformers matches it as a
        # suffix, so the text class another Auto class builds from the folder (AutoModelForCausalLM on a
        # multimodal Llama 4) leaves its head 16-bit too, unless that would skip a quantized module
        wrapped = any(n.endswith(".lm_head") for n in chosen) and "lm_head" not in chosen
        if wrapped and converts(linear, [*chosen, "lm_head"]) == quantized:
            chosen = sorted([*chosen, "lm_head"])
        return chosen
    msg = (
        f"{facts.cls_name}: no llm_int8_skip_modules list makes transformers quantize exactly the "
        "selected layers; report this model with its config.json"
    )
    raise SelectionError(msg)


# ---------------------------------------------------------------------------------------------
# facts from a live skeleton (needs transformers)


def _converter_reason(converter: Any, target: str) -> str:
    ops = [type(op).__name__ for op in getattr(converter, "operations", ())]
    if "MergeModulelist" in ops and "expert" in target:
        return "fused MoE experts (merged on load)"
    if "MergeModulelist" in ops or "Concatenate" in ops:
        return f"merged with other tensors on load (into {target})"
    if "Chunk" in ops or "Split" in ops or "SplitModulelist" in ops:
        return "fused tensor split on load (quantized it could not be split)"
    return f"converted on load ({', '.join(ops) or 'converter'})"


def is_router(name: str, module: Any) -> bool:
    leaf = name.rpartition(".")[2]
    return "Router" in type(module).__name__ or leaf in {"gate", "router", "shared_expert_gate"}


def inside_router(name: str, modules: Mapping[str, Any]) -> bool:
    """Whether module ``name`` sits inside a router: the nn.Linear that scores the experts in routers
    built around one (HunYuan-MoE's ``mlp.gate.wg``, LongCat-Flash's ``mlp.router.classifier``, DBRX's
    ``router.layer``, Gemma 4's ``router.proj``) is the router's weight and stays 16-bit as well."""
    parts = name.split(".")
    prefixes = (".".join(parts[:i]) for i in range(1, len(parts)))
    return any(p in modules and is_router(p, modules[p]) for p in prefixes)


def _key_steps() -> tuple[Any, Any]:
    """transformers' apply_renamings / apply_converters (5.2x), or the same loops for releases that
    inline them in rename_source_key (5.17): every renaming in turn, then at most one converter."""
    try:
        from transformers.core_model_loading import apply_converters, apply_renamings
    except ImportError:

        def apply_renamings(key: str, renamings: Sequence[Any]) -> str:
            for r in renamings:
                key, _ = r.rename_source_key(key)
            return key

        def apply_converters(key: str, converters: Sequence[Any]) -> tuple[str, str | None]:
            for c in converters:
                key, pattern = c.rename_source_key(key)
                if pattern is not None:
                    return key, pattern
            return key, None

    return apply_renamings, apply_converters


def facts_from_model(model: Any, keys: Sequence[str]) -> ModelFacts:
    """The facts of ``keys`` (checkpoint spellings) for a transformers model skeleton (meta device):
    exactly what Bnb4BitHfQuantizer + replace_with_bnb_linear and transformers' key conversion
    (``get_model_conversion_mapping`` + ``rename_source_key``) do with them."""
    from torch import nn
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        build_glob_alternation,
        rename_source_key,
    )
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module as hf_should_convert

    apply_renamings, apply_converters = _key_steps()
    cls_name = type(model).__name__
    modules = dict(model.named_modules())
    keep_in_fp32 = sorted(model._keep_in_fp32_modules or ())
    default_skip = HfQuantizer.get_modules_to_not_convert(model, None, keep_in_fp32)
    linear = {n: m for n, m in modules.items() if isinstance(m, Conv1D) or type(m) is nn.Linear}
    convertible = {n for n in linear if hf_should_convert(n, default_skip)}
    listed = called_through_a_list(modules)

    meta_sd = model.state_dict()
    buffers = {n for n, _ in model.named_buffers()}
    prefix = model.base_model_prefix
    mapping = get_model_conversion_mapping(model, None, None)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}

    tied = getattr(model, "all_tied_weights_keys", None) or {}
    out_emb = model.get_output_embeddings()
    # transformers' dtype plan: _keep_in_fp32_modules applies when the model dtype is float16,
    # _keep_in_fp32_modules_strict when it is float16 or bfloat16 (PreTrainedModel._get_dtype_plan)
    fp32_re = build_glob_alternation(keep_in_fp32)[0] if keep_in_fp32 else None
    strict_patterns = sorted(model._keep_in_fp32_modules_strict or ())
    strict_re = build_glob_alternation(strict_patterns)[0] if strict_patterns else None

    def default_reason(name: str, mod: Any) -> str:
        if out_emb is not None and mod is out_emb:
            return "lm_head (output embedding)"
        for a, b in tied.items():
            if module_of(a) == name:
                return f"tied to {module_of(b)}"
            if module_of(b) == name:
                return f"tied to {module_of(a)}"
        if keep_in_fp32 and not hf_should_convert(name, keep_in_fp32):
            return "_keep_in_fp32_modules"
        return "last module"

    out: dict[str, KeyFacts] = {}
    reached: set[str] = set()
    key_of: dict[str, str] = {}  # model parameter name -> checkpoint key
    for key in keys:
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta_sd)
        if renamed not in meta_sd and key in meta_sd:
            renamed, pattern = rename_source_key(key, [], [], prefix, meta_sd)
        if pattern is None:
            key_of.setdefault(renamed, key)
        fp32 = bool(fp32_re is not None and renamed in meta_sd and fp32_re.search(renamed))
        fp32_strict = bool(strict_re is not None and renamed in meta_sd and strict_re.search(renamed))
        mod_name, _, pname = renamed.rpartition(".")
        mod = modules.get(mod_name)
        is_linear_weight = renamed in meta_sd and pattern is None and mod_name in linear and pname == "weight"
        if is_linear_weight:
            reached.add(mod_name)
        reason: str | None = None
        if renamed in buffers:
            reason = "buffer"
        elif renamed not in meta_sd:
            reason = f"not a parameter of {cls_name} (transformers drops it on load)"
        elif pattern is not None:
            reason = _converter_reason(by_pattern[pattern], renamed)
        elif pname == "bias":
            reason = "bias"
        elif mod_name not in linear or pname != "weight":
            kind = type(mod).__name__ if mod is not None else "?"
            if is_router(mod_name, mod):
                reason = "router"
            elif isinstance(mod, nn.Linear):  # Falcon's FalconLinear: replace_with_bnb_linear asks type() too
                reason = f"{SUBCLASS_REASON} ({kind})"
            else:
                reason = f"not nn.Linear ({kind})"
        elif mod_name not in convertible:
            reason = default_reason(mod_name, mod)
        elif is_router(mod_name, mod) or inside_router(mod_name, modules):
            reason = "router"
        else:
            reason = read_directly(mod_name, modules) or listed.get(mod_name)
        if reason is not None:
            out[key] = KeyFacts(
                reason=reason,
                module=mod_name if is_linear_weight else "",
                linear=is_linear_weight,
                fp32=fp32,
                fp32_strict=fp32_strict,
            )
            continue
        late = None
        # the packed companions (W.absmax, ...; int8: the module's SCB) must reach the same module on
        # load (UnlimitedOcr renames projector.layers.weight alone: an int8 weight came apart from its
        # SCB and transformers + bitsandbytes left the projector uninitialised)
        renamed_key = apply_renamings(key, renamings)
        companions = (
            (key + ".absmax", renamed_key + ".absmax"),
            (key.removesuffix(".weight") + ".SCB", renamed_key.removesuffix(".weight") + ".SCB"),
        )
        for companion, expected in companions:
            companion = apply_renamings(companion, renamings)
            if companion != expected or apply_converters(companion, converters)[1] is not None:
                late = "renamed on load in a way its quantization state would not follow"
        out[key] = KeyFacts(
            reason=None,
            module=mod_name,
            transpose=isinstance(mod, Conv1D),
            late=late,
            shape=tuple(meta_sd[renamed].shape),
            linear=True,
            fp32=fp32,
            fp32_strict=fp32_strict,
        )
    for target, source in tied.items():
        if target in key_of and source in key_of:
            out[key_of[target]] = replace(out[key_of[target]], tied=key_of[source])
    base = getattr(model, prefix, None) if prefix else None
    return ModelFacts(
        matcher=matcher_of(hf_should_convert),
        cls_name=cls_name,
        prefix=prefix or "",
        has_base=base is not None and base is not model,
        keys=out,
        extra_linear=sorted(set(linear) - reached),
        defaults=sorted(d for d in default_skip if d in modules),
        keep_in_fp32=keep_in_fp32,
    )
