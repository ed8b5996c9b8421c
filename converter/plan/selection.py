"""Which checkpoint tensors get quantized: the rule transformers' bitsandbytes loader follows.

A pre-quantized checkpoint only loads correctly if transformers builds a ``bnb.nn.Linear4bit``
exactly where a quantized weight sits: a plain (unquantized) weight fed into a Linear4bit is taken
as packed data without any error, and a packed weight fed into a plain layer fails on its shape.
So the selection is made by transformers' own code whenever it is installed:

1. the model class named by ``config.architectures`` (without one, or with a name transformers lacks:
   the head the checkpoint keys fill, ``converter.plan.model_class``, the loader's lookup too) is
   built on the meta device (no weights, no remote code);
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

import importlib.util
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

from converter.plan import arch_allowlist
from converter.plan.selection_facts import SelectionError, module_of
from converter.plan.selection_facts import data_reason as _data_reason
from converter.plan.selection_facts import strip_prefix as _strip
from converter.plan.selection_facts import user_reason as _user_reason

__all__ = [
    "PATCHED_MODULES",
    "QuantizeSpec",
    "Selection",
    "SelectionError",
    "as_dict",
    "module_of",
    "select_tensors",
]


class UnknownModelError(SelectionError):
    """transformers has no model for this config (repository code, a newer model_type): only the
    user's --include globs can name the weights to quantize."""


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
    #: keys of _keep_in_fp32_modules: float32 when the model dtype is float16 (transformers' dtype plan)
    keep_fp32: set[str] = field(default_factory=set)
    mode: str = "transformers"  # "transformers" or "allowlist"
    #: where transformers' rule was read ("transformers" mode): "live" (a model skeleton), "cache"
    #: (the per-user cache of an earlier live run) or "table" (the shipped table);
    #: converter.plan.selection_table
    via: str = "live"
    #: keys of _keep_in_fp32_modules_strict: float32 when the model dtype is float16 or bfloat16
    keep_fp32_strict: set[str] = field(default_factory=set)
    #: tied pairs the checkpoint holds both of: target key -> source key (transformers' all_tied_weights_keys)
    tied: dict[str, str] = field(default_factory=dict)


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
        try:
            return _select_precomputed(config, tensors, skip=skip, include=include) or _select_transformers(
                config, tensors, skip=skip, include=include
            )
        except UnknownModelError:
            if not include:
                raise
            return _select_explicit(tensors, skip=skip, include=include)
    return _select_allowlist(config, tensors, skip=skip, include=include)


def _select_precomputed(
    config: dict, tensors: Sequence[_TensorLike], *, skip: Sequence[str], include: Sequence[str]
) -> Selection | None:
    """transformers' rule from the per-user cache or the shipped table (no import); None on a miss."""
    from converter.plan import selection_table

    found = selection_table.lookup(config, [t.name for t in tensors])
    if found is None:
        return None
    facts, via = found
    return _from_facts(facts, tensors, skip=skip, include=include, via=via)


def _from_facts(
    facts: Any,
    tensors: Sequence[_TensorLike],
    *,
    skip: Sequence[str],
    include: Sequence[str],
    via: str,
    matcher: Any = None,
) -> Selection:
    from converter.plan.selection_facts import decide

    d = decide(facts, tensors, skip=skip, include=include, matcher=matcher)
    quantize = {k: QuantizeSpec(transpose=v) for k, v in d.quantize.items()}
    return Selection(
        quantize,
        d.keep,
        d.skip_modules,
        d.keep_fp32,
        "transformers",
        via,
        keep_fp32_strict=d.keep_fp32_strict,
        tied=d.tied,
    )


# ---------------------------------------------------------------------------------------------
# helpers shared by every mode


def _shape_reason(t: _TensorLike) -> str | None:
    """Reason a tensor cannot be a quantizable weight by its name, dtype or shape, or None."""
    if t.name.endswith(".bias"):
        return "bias"
    if not t.name.endswith(".weight"):
        return "not a .weight tensor"
    return _data_reason(t)


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


def _no_tie_weights() -> Any:
    """transformers' own context that keeps ``post_init`` from tying weights (from_pretrained's)."""
    try:
        from transformers.initialization import no_tie_weights
    except ImportError:  # a transformers without it: the skeleton as its post_init leaves it
        return nullcontext()
    return no_tie_weights()


def build_skeleton(config: dict, keys: Sequence[str] | None = None) -> Any:
    """The model class ``config.json`` and the checkpoint ``keys`` describe (``converter.plan.model_class``,
    the loader's lookup too), built on the meta device: no memory, no weights, never remote code."""
    import torch
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from converter.plan.model_class import model_class

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
        raise UnknownModelError(msg)
    cfg_dict = {k: v for k, v in config.items() if k != "quantization_config"}
    with _quiet_transformers():
        try:
            # floats JSON cannot hold, as transformers' save_pretrained writes them ({"__float__":
            # "Infinity"}: GraniteMoeHybrid's time_step_limit), decoded as its from_pretrained reads them
            # (from_dict does not); a transformers without the decoder never wrote such tags
            config_class = CONFIG_MAPPING[model_type]
            decode = getattr(config_class, "_decode_special_floats", None)
            cfg = config_class.from_dict(decode(cfg_dict) if decode is not None else cfg_dict)
        except Exception as exc:  # a field of the wrong type or value: transformers' config refuses it
            detail = " ".join(str(exc).split())
            msg = f"config.json: transformers cannot read it ({type(exc).__name__}: {detail}); fix the config"
            raise SelectionError(msg) from exc
        cls = model_class(cfg, config.get("architectures") or (), keys)
        if cls is None:
            msg = (
                f"transformers has no model class for model_type '{model_type}'; "
                "name the weights to quantize with --include"
            )
            raise UnknownModelError(msg)
        try:
            # untied, as from_pretrained builds it (init.no_tie_weights) before transformers + bitsandbytes
            # take "the module of the last parameter" out of conversion: a tied head is then the last
            # parameter, not a linear before it (OLMo's last down_proj, Gemma 4's embed_vision projection)
            with torch.device("meta"), _no_tie_weights():
                model = cls(cfg)
        except Exception as exc:  # a config transformers cannot build a model from
            msg = (
                f"transformers could not build {cls.__name__} from config.json "
                f"({type(exc).__name__}: {exc}); fix the config"
            )
            raise SelectionError(msg) from exc
    return model


def _select_transformers(
    config: dict, tensors: Sequence[_TensorLike], *, skip: Sequence[str], include: Sequence[str]
) -> Selection:
    """The live rule: build the skeleton, gather its facts (remembered in the per-user cache), decide."""
    keys = [t.name for t in tensors]
    model = build_skeleton(config, keys)
    cls_name = type(model).__name__
    rebuilt = bnb_patched_modules()
    for name, mod in model.named_modules():
        kind = type(mod).__name__
        if kind in rebuilt and kind not in PATCHED_MODULES:
            msg = (
                f"{cls_name}: transformers rebuilds '{name}' ({kind}) as other layers when it loads a "
                "pre-quantized bitsandbytes checkpoint, and quantize-model does not know that layout yet; "
                "quantize this model on load with transformers + bitsandbytes instead"
            )
            raise SelectionError(msg)
    patch_for_bnb(model)
    facts = _live_facts(config, keys, model)
    return _from_facts(facts, tensors, skip=skip, include=include, via="live", matcher=_convert_rule(facts))


#: transformers' MODULES_TO_PATCH_FOR_QUANTIZATION entries whose pre-quantized layout the converter writes
#: (converter/sources/llama4.py shows Llama 4's fused experts as the per-expert weights they become).
PATCHED_MODULES = frozenset({"Llama4TextExperts"})


def bnb_patched_modules() -> frozenset[str]:
    """The module classes transformers rebuilds when it loads a pre-quantized bitsandbytes checkpoint: the
    entries of its ``MODULES_TO_PATCH_FOR_QUANTIZATION`` whose ``quantization_methods`` name bitsandbytes, as
    ``HfQuantizer._convert_model_for_quantization`` checks them (an entry without that list counts too).
    transformers 5.25 lists MiniCPM-5-MoE's experts for AWQ only: a bitsandbytes load keeps them as they
    are."""
    from transformers.quantizers.base import MODULES_TO_PATCH_FOR_QUANTIZATION
    from transformers.utils.quantization_config import QuantizationMethod

    return frozenset(
        kind
        for kind, entry in MODULES_TO_PATCH_FOR_QUANTIZATION.items()
        if QuantizationMethod.BITS_AND_BYTES
        in entry.get("quantization_methods", (QuantizationMethod.BITS_AND_BYTES,))
    )


def patch_for_bnb(model: Any) -> list[str]:
    """``model`` (on the meta device) as transformers builds it for a pre-quantized bitsandbytes checkpoint:
    its own ``HfQuantizer._convert_model_for_quantization`` run with a bitsandbytes quantization config
    (Llama 4's ``Llama4TextExperts`` become ``SequentialLlama4TextExperts``, per-expert ``nn.Linear``).
    Each replacement takes the dtype of the module it replaces. Returns the names of the replaced modules."""
    from types import SimpleNamespace

    import torch
    from transformers.quantizers.base import MODULES_TO_PATCH_FOR_QUANTIZATION, HfQuantizer
    from transformers.utils.quantization_config import QuantizationMethod

    before = {n: m for n, m in model.named_modules() if type(m).__name__ in MODULES_TO_PATCH_FOR_QUANTIZATION}
    if not before:
        return []
    fake = SimpleNamespace(
        quantization_config=SimpleNamespace(quant_method=QuantizationMethod.BITS_AND_BYTES)
    )
    HfQuantizer._convert_model_for_quantization(fake, model)
    replaced = []
    for name, old in before.items():
        new = model.get_submodule(name)
        if new is old:
            continue
        replaced.append(name)
        dtype = next((p.dtype for p in old.parameters() if p.is_floating_point()), None)
        if dtype is not None and dtype != torch.float32:
            new.to(dtype)
    return replaced


def _live_facts(config: dict, keys: Sequence[str], model: Any) -> Any:
    """transformers' facts gathered from the skeleton ``model`` for ``keys``, remembered in the per-user
    cache when their should_convert_module is one we mirror (else nothing is cached)."""
    from converter.plan import selection_table
    from converter.plan.selection_facts import facts_from_model

    with _quiet_transformers():
        facts = facts_from_model(model, keys)
    if facts.matcher is not None:
        selection_table.store_facts(config, keys, selection_table.transformers_version(), facts)
    return facts


def _convert_rule(facts: Any) -> Any:
    """The should_convert_module ``facts`` were made for: ours mirroring it, or transformers' own where
    we mirror none."""
    if facts.matcher is None:
        from transformers.quantizers.quantizers_utils import should_convert_module

        return should_convert_module
    from converter.plan.selection_facts import MATCHERS

    return MATCHERS[facts.matcher]


def as_dict(sel: Selection) -> dict[str, Any]:
    """JSON-ready form (for the conversion report)."""
    return {
        "mode": sel.mode,
        "via": sel.via,
        "quantize": {k: {"transpose": v.transpose} for k, v in sorted(sel.quantize.items())},
        "keep": dict(sorted(sel.keep.items())),
        "skip_modules": list(sel.skip_modules),
        "keep_fp32": sorted(sel.keep_fp32),
        "keep_fp32_strict": sorted(sel.keep_fp32_strict),
    }


def model_facts(config: dict, keys: Sequence[str]) -> tuple[Any, Any] | None:
    """transformers' facts for a checkpoint's ``keys`` (the shipped table or the per-user cache, else a
    skeleton on the meta device) with the ``should_convert_module`` they were made for; None when the
    table misses and transformers >= 5 is not installed. Raises SelectionError (UnknownModelError) for
    a config transformers cannot build."""
    from converter.plan import selection_table

    found = selection_table.lookup(config, keys)
    if found is not None:
        facts = found[0]
    elif transformers_usable():
        model = build_skeleton(config, keys)
        patch_for_bnb(model)
        facts = _live_facts(config, keys, model)
    else:
        return None
    return facts, _convert_rule(facts)
