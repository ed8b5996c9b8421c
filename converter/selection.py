"""Which checkpoint tensors get quantized: the rule transformers' bitsandbytes loader follows.

A pre-quantized checkpoint only loads correctly if transformers builds a ``bnb.nn.Linear4bit``
exactly where a quantized weight sits: a plain (unquantized) weight fed into a Linear4bit is taken
as packed data without any error, and a packed weight fed into a plain layer fails on its shape.
So the selection is made by transformers' own code whenever it is installed:

1. the model class named by ``config.architectures`` is built on the meta device (no weights, no
   remote code);
2. every checkpoint key is mapped to a parameter of that skeleton through transformers' own key
   conversion (``get_model_conversion_mapping`` + ``rename_source_key``: v5 renames, base-model
   prefix added or stripped, legacy ``gamma``/``beta``; fused MoE experts and other merged/split
   tensors are recognised by the converter that claims them);
3. a weight is quantized when its module is one that ``replace_with_bnb_linear`` would swap
   (``type(m) is nn.Linear`` or a GPT-2 ``Conv1D``, which is transposed to ``[out, in]``) and
   that the default skip list (``get_modules_to_not_convert``: output embedding, tied weights,
   the module of the last parameter, ``_keep_in_fp32_modules``) leaves alone, minus ``--skip``
   globs and routers, restricted to ``--include`` globs;
4. ``skip_modules`` (written as ``llm_int8_skip_modules``, which *replaces* transformers' default
   list on load) names every other Linear/Conv1D module, and is checked with transformers' own
   ``should_convert_module`` to select exactly the quantized modules.

Without transformers, ``arch_allowlist`` gives known projection names per ``model_type`` family.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from converter import arch_allowlist
from converter.errors import InputError

#: dtypes a weight must have to be quantized (the kernels take f32, f16 and bf16).
_QUANTIZABLE_DTYPES = frozenset({"F32", "F16", "BF16"})


class SelectionError(InputError):
    """The tensors to quantize cannot be decided for this checkpoint."""


class _TensorLike(Protocol):
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _CastView:
    """A tensor as --dtype will leave it (selection only reads name, dtype and shape)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class QuantizeSpec:
    """How one selected weight is quantized."""

    transpose: bool  # GPT-2 Conv1D stores [in, out]: quantize W.T ([out, in]) as transformers does


@dataclass(frozen=True)
class Selection:
    """The decision for every tensor of a checkpoint."""

    quantize: dict[str, QuantizeSpec]  # checkpoint key of each weight to quantize
    keep: dict[str, str]  # every other tensor -> human-readable reason
    skip_modules: list[str]  # config llm_int8_skip_modules: module name patterns not to build Linear4bit
    keep_fp32: set[str] = field(default_factory=set)  # keys of _keep_in_fp32_modules: never cast by --dtype
    mode: str = "transformers"  # "transformers" or "allowlist"


def transformers_usable() -> bool:
    """True when transformers >= 5 (the v5 loading machinery this module mirrors) is importable."""
    if importlib.util.find_spec("transformers") is None:
        return False
    from importlib.metadata import version

    try:
        return int(version("transformers").split(".")[0]) >= 5
    except Exception:
        return False


def select_tensors(
    config: dict | None,
    tensors: Sequence[_TensorLike],
    *,
    skip: Sequence[str] = (),
    include: Sequence[str] = (),
    use_transformers: bool | None = None,
    cast_to: str | None = None,
) -> Selection:
    """Decide, for every tensor of a checkpoint, whether it is quantized, and why not.

    ``config`` is the parsed config.json (None if the source has none); ``skip`` and ``include`` are
    fnmatch globs tried on checkpoint keys and module names (checkpoint and model spelling).
    ``use_transformers`` None means "if transformers >= 5 is installed". ``cast_to`` is --dtype's
    safetensors code ("F32", "F16", "BF16"): float64 tensors are judged as the cast will leave them,
    as transformers loads such a checkpoint in the requested dtype before quantizing.
    """
    if cast_to is not None:
        tensors = [_CastView(t.name, cast_to, tuple(t.shape)) if t.dtype == "F64" else t for t in tensors]
    if config is None:
        if include:
            return _select_explicit(tensors, skip=skip, include=include)
        msg = (
            "the source has no config.json, so the layers transformers would quantize cannot be known; "
            "add the model's config.json, or name the weights to quantize with --include globs"
        )
        raise SelectionError(msg)
    if use_transformers is None:
        use_transformers = transformers_usable()
    if use_transformers:
        if not transformers_usable():
            msg = (
                "tensor selection from the model itself needs transformers >= 5; "
                "run: pip install 'quantize-model[transformers]'"
            )
            raise SelectionError(msg)
        return _select_transformers(config, tensors, skip=skip, include=include)
    return _select_allowlist(config, tensors, skip=skip, include=include)


# ---------------------------------------------------------------------------------------------
# helpers shared by every mode


def module_of(key: str) -> str:
    """Module name of a checkpoint key ("a.b.weight" -> "a.b")."""
    return key.rpartition(".")[0]


def _glob_hit(globs: Sequence[str], names: Sequence[str]) -> str | None:
    for g in globs:
        if any(n and fnmatch.fnmatchcase(n, g) for n in names):
            return g
    return None


def _user_reason(skip: Sequence[str], include: Sequence[str], *names: str) -> str | None:
    """Reason the user's --skip / --include leave a weight unquantized, or None."""
    g = _glob_hit(skip, names)
    if g is not None:
        return f"--skip glob '{g}'"
    if include and _glob_hit(include, names) is None:
        return "not matched by --include"
    return None


def _shape_reason(t: _TensorLike) -> str | None:
    """Reason a tensor cannot be a quantizable weight by its name, dtype or shape, or None."""
    if t.name.endswith(".bias"):
        return "bias"
    if not t.name.endswith(".weight"):
        return "not a .weight tensor"
    return _data_reason(t)


def _data_reason(t: _TensorLike) -> str | None:
    """Reason a linear weight cannot be quantized by its dtype or shape, or None."""
    if t.dtype not in _QUANTIZABLE_DTYPES:
        return f"dtype {t.dtype} is not float32/float16/bfloat16"
    if len(t.shape) != 2:
        return f"{len(t.shape)}-D tensor (only 2-D linear weights are quantized)"
    if 0 in t.shape:
        return "empty tensor"
    return None


def _strip(name: str, prefixes: Sequence[str]) -> str:
    for p in prefixes:
        if p and name.startswith(p + "."):
            return name[len(p) + 1 :]
    return name


def _skip_list_from_keys(
    keep: dict[str, str], tensors: Sequence[_TensorLike], prefixes: Sequence[str]
) -> list[str]:
    """Without a model: every kept 2-D float weight's module, so transformers never builds a Linear4bit
    for an unquantized weight (llm_int8_skip_modules replaces transformers' default list).

    Names are written without the base-model prefix: transformers matches an entry as a prefix of a
    module name or as its suffix, so "layers.0.mlp.gate" covers "model.layers.0.mlp.gate" (ForCausalLM)
    and "layers.0.mlp.gate" (the bare base model) alike.
    """
    out = set()
    for t in tensors:
        if t.name in keep and t.name.endswith(".weight") and len(t.shape) == 2:
            out.add(_strip(module_of(t.name), prefixes))
    return sorted(out)


def _select_explicit(
    tensors: Sequence[_TensorLike], *, skip: Sequence[str], include: Sequence[str]
) -> Selection:
    """No config: quantize exactly the 2-D float ``.weight`` tensors the user's globs name."""
    quantize: dict[str, QuantizeSpec] = {}
    keep: dict[str, str] = {}
    for t in tensors:
        reason = _shape_reason(t) or _user_reason(skip, include, t.name, module_of(t.name))
        if reason is None:
            quantize[t.name] = QuantizeSpec(transpose=False)
        else:
            keep[t.name] = reason
    skip_modules = set(_skip_list_from_keys(keep, tensors, ()))
    if not any(module_of(k).endswith("lm_head") for k in quantize):
        skip_modules.add("lm_head")  # a tied head has no tensor but is an nn.Linear in the model
    return Selection(quantize, keep, sorted(skip_modules), set(), "allowlist")


# ---------------------------------------------------------------------------------------------
# without transformers: the per-family allowlist


def _select_allowlist(
    config: dict, tensors: Sequence[_TensorLike], *, skip: Sequence[str], include: Sequence[str]
) -> Selection:
    model_type = config.get("model_type")
    fam = arch_allowlist.family_for(model_type)
    if fam is None:
        msg = (
            f"model_type '{model_type}' is not in quantize-model's built-in list of architectures "
            f"({', '.join(arch_allowlist.known_model_types())}); to select its layers from the model "
            "itself, run: pip install 'quantize-model[transformers]'"
        )
        raise SelectionError(msg)
    quantize: dict[str, QuantizeSpec] = {}
    keep: dict[str, str] = {}
    keep_fp32: set[str] = set()
    for t in tensors:
        mod = module_of(t.name)
        if any(re.search(p, t.name) for p in fam.keep_fp32):
            keep_fp32.add(t.name)
        reason = (
            _shape_reason(t)
            or arch_allowlist.excluded(fam, mod)
            or (None if mod.rpartition(".")[2] in fam.linear else f"not a known projection of {fam.name}")
            or _user_reason(skip, include, t.name, mod)
        )
        if reason is None:
            quantize[t.name] = QuantizeSpec(transpose=fam.transpose)
        else:
            keep[t.name] = reason
    skip_modules = sorted(set(_skip_list_from_keys(keep, tensors, fam.base_prefixes)) | set(fam.always_skip))
    return Selection(quantize, keep, skip_modules, keep_fp32 - set(quantize), "allowlist")


# ---------------------------------------------------------------------------------------------
# with transformers: the model skeleton and transformers' own rules


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Building a config/model from a random config logs validation warnings; they are not ours."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(old)


def build_skeleton(config: dict) -> Any:
    """The model class of ``config.architectures[0]`` (else the base AutoModel class), built on the
    meta device: no memory, no weights, never remote code."""
    import torch
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if not model_type:
        msg = "config.json has no 'model_type'; add it (the model's architecture family, e.g. 'llama')"
        raise SelectionError(msg)
    if model_type not in CONFIG_MAPPING:
        msg = (
            f"model_type '{model_type}' is not built into transformers {transformers.__version__} "
            "(quantize-model never runs a repository's own code); upgrade transformers, or name the "
            "weights to quantize with --include"
        )
        raise SelectionError(msg)
    cfg_dict = {k: v for k, v in config.items() if k != "quantization_config"}
    with _quiet_transformers():
        cfg = CONFIG_MAPPING[model_type].from_dict(cfg_dict)
        cls = None
        for name in config.get("architectures") or ():
            cand = getattr(transformers, name, None)
            if isinstance(cand, type) and issubclass(cand, transformers.PreTrainedModel):
                cls = cand
                break
        if cls is None:
            cls = _auto_class(transformers, cfg, config.get("architectures") or ())
        if cls is None:
            msg = (
                f"transformers has no model class for model_type '{model_type}'; "
                "name the weights to quantize with --include"
            )
            raise SelectionError(msg)
        try:
            with torch.device("meta"):
                model = cls(cfg)
        except Exception as exc:  # a config transformers cannot build a model from
            msg = (
                f"transformers could not build {cls.__name__} from config.json "
                f"({type(exc).__name__}: {exc}); fix the config"
            )
            raise SelectionError(msg) from exc
    return model


#: Architecture name suffix -> the Auto class that builds the same head from a built-in model_type,
#: for configs naming a class transformers does not have (repository code, which we never run).
_AUTO_BY_SUFFIX = (
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("LMHeadModel", "AutoModelForCausalLM"),
    ("ForMaskedLM", "AutoModelForMaskedLM"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
    ("ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
    ("ForConditionalGeneration", "AutoModelForImageTextToText"),
)


def _auto_class(transformers: Any, cfg: Any, architectures: Sequence[str]) -> Any:
    """The built-in class for an architecture transformers does not name: same head, else the base model."""
    for arch in architectures:
        for suffix, auto in _AUTO_BY_SUFFIX:
            if arch.endswith(suffix):
                cls = getattr(transformers, auto)._model_mapping.get(type(cfg), None)
                if cls is not None:
                    return cls
    return transformers.AutoModel._model_mapping.get(type(cfg), None)


def _converter_reason(converter: Any, target: str) -> str:
    ops = [type(op).__name__ for op in getattr(converter, "operations", ())]
    if "MergeModulelist" in ops and "expert" in target:
        return "fused MoE experts (merged on load)"
    if "MergeModulelist" in ops or "Concatenate" in ops:
        return f"merged with other tensors on load (into {target})"
    if "Chunk" in ops or "Split" in ops or "SplitModulelist" in ops:
        return "fused tensor split on load (quantized it could not be split)"
    return f"converted on load ({', '.join(ops) or 'converter'})"


def _is_router(name: str, module: Any) -> bool:
    leaf = name.rpartition(".")[2]
    return "Router" in type(module).__name__ or leaf in {"gate", "router", "shared_expert_gate"}


def _select_transformers(
    config: dict, tensors: Sequence[_TensorLike], *, skip: Sequence[str], include: Sequence[str]
) -> Selection:
    from torch import nn
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        apply_converters,
        apply_renamings,
        build_glob_alternation,
        rename_source_key,
    )
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import MODULES_TO_PATCH_FOR_QUANTIZATION, HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    model = build_skeleton(config)
    cls_name = type(model).__name__
    modules = dict(model.named_modules())
    for name, mod in modules.items():
        if type(mod).__name__ in MODULES_TO_PATCH_FOR_QUANTIZATION:
            msg = (
                f"{cls_name}: transformers rebuilds '{name}' ({type(mod).__name__}) as separate "
                "per-expert layers when it loads a pre-quantized bitsandbytes checkpoint, which the fused "
                "checkpoint cannot fill; quantize this model on load with transformers + bitsandbytes instead"
            )
            raise SelectionError(msg)

    # exactly what Bnb4BitHfQuantizer._process_model_before_weight_loading + replace_with_bnb_linear do
    keep_in_fp32 = sorted(model._keep_in_fp32_modules or ())
    default_skip = HfQuantizer.get_modules_to_not_convert(model, None, keep_in_fp32)
    linear = {n: m for n, m in modules.items() if isinstance(m, Conv1D) or type(m) is nn.Linear}
    convertible = {n for n in linear if should_convert_module(n, default_skip)}

    # transformers' own key mapping, as convert_and_load_state_dict_in_model applies it
    meta_sd = model.state_dict()
    buffers = {n for n, _ in model.named_buffers()}
    prefix = model.base_model_prefix
    mapping = get_model_conversion_mapping(model, None, None)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}

    tied = getattr(model, "all_tied_weights_keys", None) or {}
    out_emb = model.get_output_embeddings()
    fp32_patterns = sorted(set(keep_in_fp32) | set(model._keep_in_fp32_modules_strict or ()))
    fp32_re = build_glob_alternation(fp32_patterns)[0] if fp32_patterns else None

    def default_reason(name: str, mod: Any) -> str:
        if out_emb is not None and mod is out_emb:
            return "lm_head (output embedding)"
        for a, b in tied.items():
            if module_of(a) == name:
                return f"tied to {module_of(b)}"
            if module_of(b) == name:
                return f"tied to {module_of(a)}"
        if keep_in_fp32 and not should_convert_module(name, keep_in_fp32):
            return "_keep_in_fp32_modules"
        return "last module"

    quantize: dict[str, QuantizeSpec] = {}
    keep: dict[str, str] = {}
    keep_fp32: set[str] = set()
    quantized_modules: set[str] = set()
    with _quiet_transformers():
        for t in tensors:
            key = t.name
            renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta_sd)
            if renamed not in meta_sd and key in meta_sd:
                renamed, pattern = rename_source_key(key, [], [], prefix, meta_sd)
            if fp32_re is not None and renamed in meta_sd and fp32_re.search(renamed):
                keep_fp32.add(key)
            reason = None
            if renamed in buffers:
                reason = "buffer"
            elif renamed not in meta_sd:
                reason = f"not a parameter of {cls_name} (transformers drops it on load)"
            elif pattern is not None:
                reason = _converter_reason(by_pattern[pattern], renamed)
            if reason is None:
                mod_name, _, pname = renamed.rpartition(".")
                mod = modules.get(mod_name)
                if pname == "bias":
                    reason = "bias"
                elif mod_name not in linear or pname != "weight":
                    kind = type(mod).__name__ if mod is not None else "?"
                    reason = "router" if _is_router(mod_name, mod) else f"not nn.Linear ({kind})"
                elif mod_name not in convertible:
                    reason = default_reason(mod_name, mod)
                elif _is_router(mod_name, mod):
                    reason = "router"
                else:
                    reason = _user_reason(skip, include, key, module_of(key), mod_name) or _data_reason(t)
                if reason is None and tuple(t.shape) != tuple(meta_sd[renamed].shape):
                    reason = f"shape {list(t.shape)} differs from {cls_name}'s {list(meta_sd[renamed].shape)}"
                if reason is None:
                    # the packed companions (W.absmax, ...) must reach the same module on load
                    companion = apply_renamings(key + ".absmax", renamings)
                    if companion != apply_renamings(key, renamings) + ".absmax" or (
                        apply_converters(companion, converters)[1] is not None
                    ):
                        reason = "renamed on load in a way its quantization state would not follow"
                if reason is None:
                    quantize[key] = QuantizeSpec(transpose=isinstance(mod, Conv1D))
                    quantized_modules.add(mod_name)
            if reason is not None:
                keep[key] = reason

    not_quantized = {n for n in linear if n not in quantized_modules}
    defaults = {d for d in default_skip if d in modules}
    names = sorted(not_quantized | defaults)
    skip_modules = _skip_list_for_model(model, linear, quantized_modules, names, keep_in_fp32)
    return Selection(quantize, keep, skip_modules, keep_fp32 - set(quantize), "transformers")


def _skip_list_for_model(
    model: Any,
    linear: dict[str, Any],
    quantized: set[str],
    names: list[str],
    keep_in_fp32: list[str],
) -> list[str]:
    """llm_int8_skip_modules for ``names``, checked with transformers' own matcher.

    Preferred spelling: without the base-model prefix ("layers.0.mlp.down_proj"), which transformers
    matches both as a suffix of "model.layers.0.mlp.down_proj" (the ForCausalLM class) and as a prefix
    of the bare base model's names, so AutoModel loads the folder right too. Falls back to the full
    names if that spelling would catch a module we quantized.
    """
    from transformers.quantizers.quantizers_utils import should_convert_module

    prefix = model.base_model_prefix
    base = getattr(model, prefix, None) if prefix else None
    has_base = base is not None and base is not model

    def converts(candidates: set[str], patterns: list[str]) -> set[str]:
        return {n for n in candidates if should_convert_module(n, patterns + keep_in_fp32)}

    stripped = sorted({_strip(n, (prefix,)) for n in names}) if has_base else names
    ok = converts(set(linear), stripped) == quantized
    if ok and has_base:
        base_linear = {n[len(prefix) + 1 :] for n in linear if n.startswith(prefix + ".")}
        base_quant = {n[len(prefix) + 1 :] for n in quantized if n.startswith(prefix + ".")}
        ok = converts(base_linear, stripped) == base_quant
    if ok:
        return stripped
    if converts(set(linear), names) == quantized:
        return names
    msg = (
        f"{type(model).__name__}: no llm_int8_skip_modules list makes transformers quantize exactly the "
        "selected layers; report this model with its config.json"
    )
    raise SelectionError(msg)


def as_dict(sel: Selection) -> dict[str, Any]:
    """JSON-ready form (for the conversion report)."""
    return {
        "mode": sel.mode,
        "quantize": {k: {"transpose": v.transpose} for k, v in sorted(sel.quantize.items())},
        "keep": dict(sorted(sel.keep.items())),
        "skip_modules": list(sel.skip_modules),
        "keep_fp32": sorted(sel.keep_fp32),
    }
