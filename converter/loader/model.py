"""``load_quantized``: a transformers model built from a pre-quantized folder, without bitsandbytes' loader.

1. ``config.json`` -> the class named by ``architectures`` (else the head the shards fill: the
   converter's lookup, ``converter.plan.model_class``) or the one ``model_class=`` asks for, built with
   its parameters on the meta device (buffers such as rotary tables are computed for real);
2. every module whose ``<name>.weight`` is quantized in the shards becomes a :class:`Linear4bit`
   sharing the memory-mapped tensors; this is checked against the set transformers' bnb integration
   would swap (``llm_int8_skip_modules`` or its default skips) and a difference is reported;
3. the other tensors are assigned from the shards (still mapped when the dtype already matches,
   cast otherwise) and weights are tied; a quantized layer the shards lack is an error naming it,
   any other parameter they lack (a new classification head) is initialised as ``from_pretrained``
   initialises it, with a warning naming it.

transformers is imported here only; the state API and ``replace_linear_layers`` work without it.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import os
import threading
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from converter.kernels.isa_env import forced_isa
from converter.loader import ops, router, timing
from converter.loader.config_file import config_edit_note, config_edits_named, read_config
from converter.loader.dequantize_inplace import bind_dequantize
from converter.loader.devices import check_device, check_devices_exist, device_argument
from converter.loader.file_mappings import drop_pages, file_mappings, page_ranges
from converter.loader.footprint import install_footprint
from converter.loader.head import install_fast_head
from converter.loader.model_build import ModelBuildError, class_to_build
from converter.loader.module import QuantLinear4bit, dtype_from_name
from converter.loader.moe import moe_modules, prefix_variants, rename_key
from converter.loader.moe_attach import attach_experts
from converter.loader.replace import (
    CheckpointMismatchError,
    compute_dtype_from_config,
    is_swappable,
    mark_quantized,
    quantized_modules,
    swap_layers,
)
from converter.loader.siblings import group_siblings
from converter.loader.state import read_state, resolve_folder, shard_files, shards_verified, streams_to
from converter.loader.warmup import BUILD_LOCK, warmed
from converter.methods import for_record
from converter.user_frame import user_stacklevel


class UnexpectedArgumentError(ModelBuildError, TypeError):
    """A keyword argument of ``load_quantized`` that neither the config nor the model class takes (a
    TypeError, as ``from_pretrained`` raises for it)."""


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Parameters are created on the meta device, buffers for real (accelerate's init_empty_weights).

    The hook is process-wide but acts only in the calling thread: another thread registering a
    parameter meanwhile (``tie_weights`` of a model loaded beside this one, a module built by the
    application) keeps its real tensor."""
    original = nn.Module.register_parameter
    owner = threading.get_ident()

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta" and threading.get_ident() == owner:
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _no_init_weights() -> contextlib.AbstractContextManager:
    """transformers' switch that skips random init (every parameter is filled from the shards)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _requested_class(requested: type, config: Any, folder: Path, *, trust_remote_code: bool) -> type:
    """The class ``model_class=`` names for this config, as ``from_pretrained`` of that class picks it:
    a ``PreTrainedModel`` subclass as it is; for an Auto class, the repository code its name maps to in
    ``auto_map`` when trusted, else its mapping's class for the config type (transformers'
    ``_get_model_class``: the one ``architectures`` names when the mapping holds several)."""
    import transformers

    if isinstance(requested, type) and issubclass(requested, transformers.PreTrainedModel):
        return requested
    mapping = getattr(requested, "_model_mapping", None)
    if not isinstance(requested, type) or mapping is None:
        msg = f"model_class must be a transformers model class or Auto class, not {requested!r}"
        raise ModelBuildError(msg)
    ref = (getattr(config, "auto_map", None) or {}).get(requested.__name__)
    if trust_remote_code and isinstance(ref, str):
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(ref, str(folder))
    try:
        from transformers.models.auto.auto_factory import _get_model_class
    except ImportError:  # another transformers version: the mapping's entry as it is

        def _get_model_class(config: Any, mapping: Any) -> type:
            found = mapping[type(config)]
            return found[0] if isinstance(found, (list, tuple)) else found

    try:
        return _get_model_class(config, mapping)
    except (KeyError, ValueError):
        msg = f"{requested.__name__} has no model class for model_type {config.model_type!r}"
        if isinstance(ref, str):
            msg += " (config.json names repository code in auto_map: pass trust_remote_code=True to run it)"
        raise ModelBuildError(msg) from None


def _text_config_for(requested: type, cls: type, config: Any) -> Any:
    """The config an Auto ``model_class`` builds ``cls`` from, as its ``from_pretrained`` does: a composite
    config's ``text_config`` where ``cls`` takes that (``AutoModelForCausalLM`` on a Llama 4
    multimodal folder builds the text-only causal LM), else ``config``."""
    if _is_model_class(requested):
        return config  # read with cls.config_class already (_read_config)
    text_class = (getattr(config, "sub_configs", None) or {}).get("text_config")
    if text_class is not None and getattr(cls, "config_class", None) is text_class:
        return config.get_text_config()
    return config


def _is_model_class(requested: type | None) -> bool:
    """Whether ``requested`` is a concrete transformers model class with its own config class (not an
    Auto class): its ``from_pretrained`` reads the config with that class."""
    import transformers

    return (
        isinstance(requested, type)
        and issubclass(requested, transformers.PreTrainedModel)
        and getattr(requested, "config_class", None) is not None
    )


def refuse_gguf_file(config_kwargs: Mapping[str, Any], caller: str = "load_quantized") -> None:
    """``gguf_file=`` (a ``from_pretrained`` option): an UnexpectedArgumentError naming it and what to do.
    AutoConfig took it and looked for the GGUF on the Hub, failing with an OSError about a bogus
    ``huggingface.co//tmp/...`` URL."""
    if "gguf_file" not in config_kwargs:
        return
    msg = (
        f"{caller}() got an unexpected keyword argument gguf_file={config_kwargs['gguf_file']!r}: it reads "
        "a pre-quantized safetensors folder (quantize-model convert's output), not a GGUF file; convert the "
        "GGUF to a safetensors checkpoint first (AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)"
        ".save_pretrained(out), as converter/tools/samples.py does), then quantize that folder with "
        "quantize-model convert"
    )
    raise UnexpectedArgumentError(msg)


def _read_config(
    folder: Path, requested: type | None, config_kwargs: Mapping[str, Any], *, trust_remote_code: bool
) -> tuple[Any, dict[str, Any]]:
    """config.json as ``from_pretrained`` reads it: with the requested model class's ``config_class``
    (AutoConfig for an Auto class or none), ``config_kwargs`` set where the config has the attribute
    (``num_labels=3``, ``id2label``, ``problem_type``); the others, for the model's ``__init__``."""
    import transformers

    refuse_gguf_file(config_kwargs)  # estimate's way here (load_quantized refused it before any work)

    from huggingface_hub.errors import StrictDataclassError

    try:
        if _is_model_class(requested):
            return requested.config_class.from_pretrained(folder, return_unused_kwargs=True, **config_kwargs)
        return transformers.AutoConfig.from_pretrained(
            folder, trust_remote_code=trust_remote_code, return_unused_kwargs=True, **config_kwargs
        )
    except StrictDataclassError as exc:  # a field of the wrong type ("num_hidden_layers": "two"), as
        # convert words it (it was "unexpected StrictDataclassFieldValidationError" on two lines, exit 1)
        detail = " ".join(str(exc).split())
        msg = (
            f"{Path(folder) / 'config.json'}: transformers cannot read it ({type(exc).__name__}: {detail}); "
        )
        raise ModelBuildError(msg + "fix the config") from None
    except ValueError as exc:  # a model_type this transformers lacks: its many-line ValueError was
        # "unexpected" (exit 1 in the CLI); repository code to trust is transformers' own refusal, kept
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        model_type = (read_config(folder) or {}).get("model_type")
        if "trust_remote_code" in str(exc) or not isinstance(model_type, str) or model_type in CONFIG_MAPPING:
            raise
        msg = (
            f"{Path(folder) / 'config.json'}: model_type {model_type!r} is not built into transformers "
            f"{transformers.__version__}, and no repository code (auto_map's AutoConfig) builds its config; "
            "upgrade transformers, or fix config.json"
        )
        raise ModelBuildError(msg) from None


def _new_modules(absent: set[str], own: type | None, cls: type, config: Any) -> frozenset[str]:
    """Those of ``absent`` (modules of ``cls`` with no weight in the shards) that the folder's own class
    ``own`` has no parameter for either (a head ``cls`` adds), matched through the base-model prefix as
    transformers' loader matches keys; all of them when ``own`` is unknown or cannot be built."""
    from converter.plan.model_class import _quiet, meta_model, parameter_names, prefixed_key

    if not absent or own is cls:
        return frozenset()
    if own is None:
        return frozenset(absent)
    try:
        with _quiet():
            reference = meta_model(own, config)
    except Exception:  # a class this config cannot build: nothing to compare with
        return frozenset(absent)
    names = parameter_names(reference)
    prefix = getattr(reference, "base_model_prefix", "") or ""
    return frozenset(m for m in absent if prefixed_key(f"{m}.weight", prefix, names) not in names)


def _drop_orphan_records(model: nn.Module, state: dict[str, Any]) -> list[str]:
    """Take the quantized weights (and their biases) whose module the model lacks out of ``state``
    (a checkpoint's pooler or LM head under another head class: transformers' unexpected keys)."""
    modules = dict(model.named_modules())
    dropped = []
    for name in quantized_modules(state):
        if name not in modules:
            dropped.append(f"{name}.weight")
            state.pop(f"{name}.weight")
            if state.pop(f"{name}.bias", None) is not None:
                dropped.append(f"{name}.bias")
    return dropped


def _decode_quantized_routers(model: nn.Module, state: dict[str, Any]) -> None:
    """Decode, in ``state``, the quantized weights of MoE routers that are no linear layer in this
    transformers: transformers 4.x + bitsandbytes quantized every nn.Linear but the head, and the
    routers (``block_sparse_moe.gate``, ``mlp.gate``) were nn.Linear then; 5.x's router modules hold a
    plain weight. It gets the record decoded to its original dtype, the weight transformers 4.x's
    Linear4bit computed with (unsloth-zoo loads such folders the same way)."""
    from converter.plan.moe import router_modules

    modules = dict(model.named_modules())
    for name, record in quantized_modules(state).items():
        module = modules.get(name)
        weight = module._parameters.get("weight") if module is not None else None
        if (
            weight is None
            or is_swappable(module)
            or not router_modules([f"{name}.weight"], ())
            or tuple(weight.shape) != tuple(record.shape)
            or getattr(record, "dtype", None) is None
        ):
            continue
        dtype = dtype_from_name(record.dtype)
        if any(isinstance(v, torch.Tensor) and v.is_meta for v in vars(record).values()):  # a Hub estimate
            state[f"{name}.weight"] = torch.empty(record.shape, dtype=dtype, device="meta")
        else:
            state[f"{name}.weight"] = for_record(record).dequantize(record, dtype)


def transformers_quantization_config(qc: dict[str, Any]) -> Any:
    """What transformers' ``from_pretrained`` leaves in ``model.config.quantization_config``: its
    ``BitsAndBytesConfig`` (``.load_in_4bit``, ``.bnb_4bit_quant_type``, ``to_dict()``; building it needs
    no bitsandbytes), so code written against transformers reads the same attributes; the dict itself
    where this transformers cannot build one from it."""
    try:
        from transformers.quantizers.auto import AutoQuantizationConfig

        return AutoQuantizationConfig.from_dict(dict(qc))
    except (ImportError, ValueError, TypeError, KeyError):
        return qc


def _skipping(qc: dict[str, Any], new: frozenset[str], model: nn.Module) -> dict[str, Any]:
    """``qc`` with ``new`` (layers the shards lack, left 16-bit, that transformers would quantize: a new
    classification head) in its ``llm_int8_skip_modules``, as the loaded model's layers are. The folder's
    own list (``["lm_head"]``) made ``save_pretrained`` write a folder on which transformers +
    bitsandbytes built a quantized layer for the saved 16-bit head, and failed to load or run it."""
    if not new:
        return qc
    skip = qc.get("llm_int8_skip_modules")
    if skip is None:  # transformers' default skips, which do not cover these: written out, plus them
        from transformers.quantizers.base import get_keys_to_not_convert

        skip = list(get_keys_to_not_convert(model))
    return {**qc, "llm_int8_skip_modules": [*skip, *sorted(n for n in new if n not in skip)]}


def _match_prefix(model: nn.Module, state: dict[str, Any]) -> None:
    """Rename ``state``'s keys (in place, order kept) as transformers' loader does with the base-model
    prefix: stripped for a model without it (``roberta.*`` keys into ``RobertaModel``), added for one
    with it (a base-model checkpoint into ``RobertaForMaskedLM``)."""
    from converter.plan.model_class import parameter_names, prefixed_key

    prefix = getattr(model, "base_model_prefix", "") or ""
    names = parameter_names(model)
    if not prefix or all(k in names for k in state):
        return
    renamed = {prefixed_key(k, prefix, names): v for k, v in state.items()}
    if len(renamed) == len(state):  # never two keys onto one name
        state.clear()
        state.update(renamed)


def transformers_would_quantize(model: nn.Module, quantization_config: dict | None) -> set[str]:
    """The module names transformers' bnb integration turns into Linear4bit for this config."""
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    qc = quantization_config or {}
    skip = qc.get("llm_int8_skip_modules")
    patterns = list(skip) if skip is not None else list(get_keys_to_not_convert(model))
    patterns += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return {n for n, m in model.named_modules() if is_swappable(m) and should_convert_module(n, patterns)}


def dtype_plan(model: nn.Module, dtype: torch.dtype) -> Callable[[str], torch.dtype | None]:
    """The dtype transformers' dtype plan gives a key (``_keep_in_fp32_modules`` when ``dtype`` is float16,
    ``_keep_in_fp32_modules_strict`` when it is float16 or bfloat16), None where it gives none: the
    patterns searched anywhere in the key, as ``from_pretrained`` matches them (core_model_loading)."""
    get_plan = getattr(model, "_get_dtype_plan", None)
    plan: dict[str, torch.dtype] = get_plan(dtype) if callable(get_plan) else {}
    if not plan:
        return lambda key: None
    try:
        from transformers.core_model_loading import build_glob_alternation
    except ImportError:  # a transformers without it: the plan's names searched as plain substrings
        return lambda key: next((d for name, d in plan.items() if name in key), None)

    alternation, by_group, _ = build_glob_alternation(list(plan))

    def planned(key: str) -> torch.dtype | None:
        m = alternation.search(key)
        return plan[by_group[m.lastgroup]] if m is not None and m.lastgroup is not None else None

    return planned


def _convert_16bit(model: nn.Module, state: dict[str, Any]) -> None:
    """Run transformers' weight converters (``Chunk``, ``Concatenate``...: HRM's fused ``attn.gqkv_proj``
    split into its q/k/v/gate projections, Kimi-Linear's q/k/v convolutions stacked) on the 16-bit
    tensors of ``state`` that name no parameter or buffer of the model, or one of another shape
    (Inkling2's padded ``lm_head.weight`` sliced), as ``from_pretrained`` does: the
    targets replace their sources in ``state`` (in place). A group whose sources include a quantized
    record, whose conversion fails or whose targets are not the model's tensors of those shapes is left
    as it is (reported unused). MoE experts were taken out of ``state`` before (attach_experts)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter
    except ImportError:  # another transformers: no converters
        return
    slots = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
    # keys the model has no tensor for, or one of another shape (Inkling2's padded lm_head.weight, which
    # a converter of the same name slices to the unpadded vocabulary)
    pending = [
        k
        for k, v in state.items()
        if k not in slots or (isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(slots[k].shape))
    ]
    if not pending:
        return
    try:
        mapping = get_model_conversion_mapping(model, None, None)
        converters = [c for c in mapping if isinstance(c, WeightConverter)]
    except Exception:  # another transformers version: none
        return
    groups: dict[tuple[int, str], tuple[Any, list[tuple[str, str]]]] = {}
    for key in pending:
        renamed = rename_key(model, key)  # the renamings first (Sarvam-MoE: .attention. -> .self_attn.)
        for conv in converters:
            layer, pattern = conv.rename_source_key(renamed)
            if pattern is not None:
                groups.setdefault((id(conv), layer), (conv, []))[1].append((key, pattern))
                break
    for (_, layer), (conv, items) in groups.items():
        if not all(isinstance(state[k], torch.Tensor) for k, _ in items):
            continue
        for key, pattern in items:
            conv.add_tensor(layer, key, pattern, lambda value=state[key]: value)
        try:
            out = conv.convert(layer, model=model, config=getattr(model, "config", None))
        except Exception:  # an operation this model's tensors do not fit: left unused, as before
            continue
        if not out or not all(
            isinstance(v, torch.Tensor) and k in slots and tuple(v.shape) == tuple(slots[k].shape)
            for k, v in out.items()
        ):
            continue
        for key, _ in items:
            del state[key]
        state.update(out)


def _fill(
    model: nn.Module,
    state: dict[str, Any],
    where: str,
    dtype: torch.dtype,
    casts: dict[torch.Tensor, torch.dtype] | None = None,
    mappings: list[tuple[int, int]] | None = None,
) -> list[str]:
    """Assign the non-quantized tensors, floats in the dtype ``from_pretrained(dtype=dtype)`` gives them
    (its dtype plan, else the empty model's); returns checkpoint keys the model has no slot for.

    With ``casts`` (a load with a ``device_map``), a parameter to be cast stays a view of the shards and
    ``casts`` gets it and its dtype: placement casts it on its device, one at a time, and writes a disk
    one to ``offload_folder`` (``placement.dispatch``), so no cast copy of a disk parameter is ever held
    in RAM beside the others. ``mappings``: the shards' (``file_mappings``); the pages of a tensor cast
    here leave the process after its cast (nothing reads them again)."""
    params = dict(model.named_parameters(remove_duplicate=False))  # both names of a tied pair
    buffers = dict(model.named_buffers())
    planned = dtype_plan(model, dtype)
    unused = []
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):  # a quantized record (4-bit or int8): already swapped in
            continue
        module_name, _, attr = key.rpartition(".")
        target = params.get(key)
        if target is None and key in buffers:
            target = buffers[key]
        if target is None:
            if key.endswith(".bias") and module_name in quantized_modules(state):
                continue  # already given to the Linear4bit
            unused.append(key)
            continue
        if tuple(target.shape) != tuple(value.shape):
            msg = (
                f"{where}: tensor {key!r} has shape {list(value.shape)}, the model wants {list(target.shape)}"
            )
            raise ModelBuildError(msg)
        # Keep the model's dtype plan (e.g. _keep_in_fp32_modules); a matching dtype stays memory-mapped.
        wanted = (planned(key) if value.is_floating_point() else None) or target.dtype
        deferred = casts is not None and key in params and value.dtype != wanted
        data = value if value.dtype == wanted or deferred else value.to(wanted)
        if data is not value:
            drop_pages(page_ranges([value], mappings or []))
        module = model.get_submodule(module_name)
        if key in params:
            module._parameters[attr] = param = nn.Parameter(data, requires_grad=False)
            if deferred:
                casts[param] = wanted  # type: ignore[index]
        else:
            module._buffers[attr] = data
    return unused


def _tie_weights(model: nn.Module) -> None:
    """Tie weights as ``from_pretrained`` does: a pair whose both tensors the shards hold stays untied
    when their values differ (transformers warns and keeps both; tying would overwrite one)."""
    missing = {n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"}
    try:
        model.tie_weights(missing_keys=missing, recompute_mapping=False)
    except TypeError:  # transformers < 5: no checkpoint-aware tying
        model.tie_weights()


def _computes_in_input_dtype(state: Mapping[str, Any]) -> bool:
    """Whether the folder's method computes in the input's dtype (LLM.int8), from its first record.
    (A function, so no local keeps that record, possibly a MoE expert, alive through the build.)"""
    first = next((v for v in state.values() if not isinstance(v, torch.Tensor)), None)
    return first is not None and for_record(first).computes_in_input_dtype


class Skeleton(NamedTuple):
    """What :func:`build_skeleton` builds, and how its modules stand against the shards."""

    model: nn.Module
    quantization_config: dict | None
    #: Modules transformers + bitsandbytes would quantize that the shards lack and the folder's own class
    #: lacks too (a head ``model_class`` adds): left unquantized, to be initialised.
    new_quantizable: frozenset[str] = frozenset()
    #: Modules transformers + bitsandbytes would quantize that the shards lack although the folder's own
    #: class has them (a truncated conversion, a config that does not describe the shards): refused.
    truncated: frozenset[str] = frozenset()
    #: Quantized checkpoint weights (and biases) whose module ``model_class`` lacks: left out, unused.
    dropped: tuple[str, ...] = ()


class Built(NamedTuple):
    """The transformers model of a folder, on the meta device, before any layer is swapped: what
    :func:`build_model` makes from the config and the shard headers alone."""

    model: nn.Module
    config: Any  # the config it was built from (model_class's overrides applied)
    own: type | None  # the folder's own class (None when only model_class could be built)
    quantization_config: Any
    compute_dtype: torch.dtype | None


def build_model(
    folder: Path,
    state: Mapping[str, Any],
    dtype: torch.dtype,
    *,
    trust_remote_code: bool = False,
    model_class: type | None = None,
    config_kwargs: Mapping[str, Any] | None = None,
) -> Built:
    """The first half of :func:`build_skeleton`: the model class built from ``config.json`` with its
    parameters on the meta device. Needs only ``state``'s keys and records' metadata, so a streamed
    load runs it while the shards are read (``load_quantized``)."""
    if not (folder / "config.json").is_file():
        from converter.writer.manifest import unfinished_conversion

        msg = unfinished_conversion(folder) or (
            f"{folder}: no config.json; use load_quantized_state and replace_linear_layers instead"
        )
        raise ModelBuildError(msg)
    raw_config = read_config(folder) or {}
    qc = raw_config.get("quantization_config")
    compute_dtype = compute_dtype_from_config(folder, state)
    if compute_dtype is None and not _computes_in_input_dtype(state):
        compute_dtype = dtype  # LLM.int8 layers keep None: they compute in the input's dtype

    config, model_kwargs = _read_config(
        folder, model_class, config_kwargs or {}, trust_remote_code=trust_remote_code
    )
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we build the 4-bit layers ourselves
    try:  # the folder's own class: the one to build, or the reference for a head model_class adds
        own: type | None = class_to_build(
            config, folder, trust_remote_code=trust_remote_code, keys=list(state)
        )
    except ModelBuildError:
        if model_class is None:
            raise
        own = None
    cls = own
    build_config = config
    if model_class is not None:
        cls = _requested_class(model_class, config, folder, trust_remote_code=trust_remote_code)
        build_config = _text_config_for(model_class, cls, config)
    assert cls is not None
    _check_init_kwargs(cls, model_kwargs)
    try:
        with BUILD_LOCK, _params_on_meta(), _no_init_weights(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls._from_config(build_config, dtype=dtype, **model_kwargs)
    except Exception as exc:
        why = f"{type(exc).__name__}: {exc}"
        msg = f"{folder}: transformers could not build {cls.__name__} from config.json ({why})"
        raise ModelBuildError(msg) from exc
    _patch_per_expert(model, state)
    return Built(model, config, own, qc, compute_dtype)


def _patch_per_expert(model: nn.Module, state: Mapping[str, Any]) -> None:
    """Llama 4 with per-expert keys in the shards (``<experts>.<e>.gate_proj.weight``, as the converter
    and transformers + bitsandbytes write it): the model as transformers builds it for a pre-quantized
    checkpoint, each ``Llama4TextExperts`` a ``SequentialLlama4TextExperts`` of per-expert nn.Linear
    (``converter.plan.selection.patch_for_bnb``), whose layers are then swapped like any other."""
    from converter.plan.selection import PATCHED_MODULES, patch_for_bnb

    names = [n for n, m in model.named_modules() if type(m).__name__ in PATCHED_MODULES]
    # under either base-model prefix, as _match_prefix renames the keys after this build: the keys of
    # a Llama4ForCausalLM folder are model.layers.*, Llama4TextModel's modules (AutoModel) layers.*
    keys = {k for n in names for k in prefix_variants(model, f"{n}.0.gate_proj.weight")}
    if any(k in state for k in keys):
        with BUILD_LOCK:
            patch_for_bnb(model)


#: the keyword arguments transformers' ``_from_config`` takes itself, not handing them to ``__init__``
_FROM_CONFIG_KWARGS = frozenset({"attn_implementation", "experts_implementation", "torch_dtype"})


def _check_init_kwargs(cls: type, model_kwargs: Mapping[str, Any]) -> None:
    """An UnexpectedArgumentError (a TypeError) naming the keyword arguments that are neither config
    attributes nor arguments of ``cls.__init__`` (``output_loading_info=True``, ``variant=``: loading
    options of ``from_pretrained`` that ``load_quantized`` does not take), as ``from_pretrained`` fails
    on them, instead of "could not build ... from config.json" blaming the folder."""
    params = inspect.signature(cls.__init__).parameters.values()
    if not model_kwargs or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    unknown = sorted(set(model_kwargs) - {p.name for p in params} - _FROM_CONFIG_KWARGS)
    if unknown:
        msg = (
            f"load_quantized() got an unexpected keyword argument{'s' * (len(unknown) > 1)} "
            f"{', '.join(map(repr, unknown))}: not attributes of {cls.__name__}'s config, nor arguments of "
            f"its __init__, nor loading options load_quantized takes"
        )
        raise UnexpectedArgumentError(msg)


class EarlyBuild:
    """:func:`build_model` run as ``read_state``'s ``while_reading``: on the caller's thread while the
    readers stream (the caller would only wait for them), its error kept for :meth:`result`, raised
    where the build used to be, after the shards' own errors."""

    def __init__(self, folder: Path, dtype: torch.dtype, **kwargs: Any) -> None:
        self.folder, self.dtype, self.kwargs = folder, dtype, kwargs
        self._built: Built | None = None
        self._error: Exception | None = None

    def __call__(self, parsed: Mapping[str, Any]) -> None:
        try:
            self._built = build_model(self.folder, parsed, self.dtype, **self.kwargs)
        except Exception as exc:
            self._error = exc

    def result(self) -> Built | None:
        """The model built while reading (None if it was not run: the load builds it then)."""
        if self._error is not None:
            raise self._error
        return self._built


def build_skeleton(
    folder: Path,
    state: dict[str, Any],
    dtype: torch.dtype,
    *,
    trust_remote_code: bool = False,
    experts_device: str | torch.device = "cpu",
    model_class: type | None = None,
    config_kwargs: Mapping[str, Any] | None = None,
    built: Built | None = None,
) -> Skeleton:
    """The model of ``folder/config.json`` (or of ``model_class``, the config updated with
    ``config_kwargs``) with its parameters on the meta device and every quantized module already a
    :class:`Linear4bit` sharing ``state``'s mapped tensors; and the quantization_config. ``built``:
    :func:`build_model`'s result for the same arguments, made earlier (while the shards streamed).

    Nothing but shard headers is read: ``inspect --memory`` sizes a placement from this skeleton.
    """
    if built is None:
        built = build_model(
            folder,
            state,
            dtype,
            trust_remote_code=trust_remote_code,
            model_class=model_class,
            config_kwargs=config_kwargs,
        )
    model, config, own, qc, compute_dtype = built
    cls = type(model)

    # MoE experts (loader/moe.py): takes the per-expert tensors out of `state`, renames e.g. Mixtral's router
    dropped = attach_experts(model, state, compute_dtype, where=str(folder), device=experts_device)
    _match_prefix(model, state)
    # another class, or config.json overridden (num_hidden_layers=1): quantized weights with no module are
    # unused, as transformers reports them (they were a CheckpointMismatchError where it loads)
    dropped += _drop_orphan_records(model, state) if model_class is not None or config_kwargs else []
    _decode_quantized_routers(model, state)
    try:
        expected: set[str] | None = transformers_would_quantize(model, qc if isinstance(qc, dict) else None)
    except (ImportError, AttributeError, TypeError):  # another transformers version: skip the check
        expected = None
    absent = {m for m in expected or () if f"{m}.weight" not in state}
    new = _new_modules(absent, own, cls, config)
    if expected is not None:
        expected -= new  # reported with the other new parameters, once they are initialised
    swapped = set(
        swap_layers(
            model,
            state,
            compute_dtype,
            where=str(folder),
            quantization_config=qc if isinstance(qc, dict) else None,
        )
    )
    if expected is not None and swapped != expected:
        extra, missing = sorted(swapped - expected), sorted(expected - swapped)
        warnings.warn(
            f"{folder}: transformers + bitsandbytes would load this folder differently: quantized in "
            f"the shards but not by transformers: {extra[:5]}; swapped by transformers but not "
            f"quantized: {missing[:5]}",
            stacklevel=user_stacklevel(),  # reached from load_quantized and inspect --memory
        )
    return Skeleton(model, qc if isinstance(qc, dict) else None, new, frozenset(absent - new), tuple(dropped))


def _non_persistent_buffers(model: nn.Module) -> list[str]:
    """The model's own non-persistent buffers (rotary tables, position ids), not our 4-bit modules'."""
    return [
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules()
        if not type(module).__module__.startswith("converter.")
        for name in module._non_persistent_buffers_set
        if module._buffers.get(name) is not None
    ]


def _initialize_missing(
    model: nn.Module, names: Collection[str], device: str | torch.device, recompute: Collection[str] = ()
) -> None:
    """Give each of ``names`` (parameters and buffers still on the meta device) an empty tensor on
    ``device`` in its dtype and initialise it as ``from_pretrained`` initialises the keys a checkpoint
    lacks: every other tensor is flagged ``_is_hf_initialized`` and the model's ``initialize_weights``
    runs (``_init_weights`` module by module, children first; transformers' init functions skip
    flagged tensors), so the same tensors draw from the generator in the same order, and after the
    same ``torch.manual_seed`` hold transformers' values. New parameters are frozen like the rest.

    ``recompute`` (the non-persistent buffers) are left unflagged too, as ``from_pretrained`` leaves
    them: ``_init_weights`` computes them again, outside the build's default dtype (GPT-J's rotary
    table, made with the default dtype, is otherwise rounded to bf16 in a bf16 build); a buffer it
    does not touch keeps the value the build gave it."""
    made: dict[int, torch.Tensor] = {}  # a tied pair left missing gets one tensor
    for name in names:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if attr in module._parameters:
            old = module._parameters[attr]
            assert old is not None
            new = made.setdefault(
                id(old), nn.Parameter(torch.empty_like(old, device=device), requires_grad=False)
            )
            module._parameters[attr] = new  # type: ignore[assignment]
        else:
            old = module._buffers[attr]
            assert old is not None
            module._buffers[attr] = made.setdefault(id(old), torch.empty_like(old, device=device))
    missing = set(names) | set(recompute)
    for name, tensor in itertools.chain(
        model.named_parameters(remove_duplicate=False), model.named_buffers()
    ):
        if name not in missing:
            tensor._is_hf_initialized = True  # type: ignore[attr-defined]
    initialize = getattr(model, "initialize_weights", None)
    if callable(initialize):
        initialize()
    else:  # transformers < 5
        model.apply(model._init_weights)  # type: ignore[operator]


def _new_parameters_warning(
    folder: Path, cls: type, names: list[str], new_quantizable: frozenset[str], dtype: torch.dtype
) -> str:
    shown = names if len(names) <= 10 else [*names[:10], f"... {len(names) - 10} more"]
    msg = (
        f"{folder}: {len(names)} parameter(s) of {cls.__name__} are not in the shards and were newly "
        f"initialized (the model's _init_weights): {shown}. Train them on your downstream task "
        f"(they are frozen, as the loaded weights are: requires_grad_(), or PEFT modules_to_save)"
    )
    if new_quantizable:
        msg += (
            f". transformers + bitsandbytes would make {sorted(new_quantizable)} quantized layers "
            "(config.json's llm_int8_skip_modules does not name them) and fail to initialise them; "
            f"here they stay {str(dtype).removeprefix('torch.')}, and model.config's "
            "llm_int8_skip_modules names them (save_pretrained writes a folder transformers loads)"
        )
    return msg


@timing.timed  # QM_LOAD_TIMING=1: the phases on stderr (loader/timing.py)
def load_quantized(
    path_or_repo: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = torch.bfloat16,
    *,
    verify: bool | str = True,
    trust_remote_code: bool = False,
    revision: str | None = None,
    device_map: str | int | torch.device | dict[str, int | str] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | os.PathLike | None = None,
    fused_router: bool = True,
    model_class: type | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    low_cpu_mem_usage: bool | None = None,
    use_safetensors: bool | None = None,
    subfolder: str = "",
    **config_kwargs: Any,
) -> nn.Module:
    """A transformers model from a pre-quantized folder (or Hub repo id), ready for ``generate()``.

    ``device_map`` ("auto", "balanced", "balanced_low_0", "sequential", a dict module -> GPU index /
    "cpu" / "disk", or one device: ``"cuda:1"``, a GPU index ``0``), ``max_memory`` and ``offload_folder``
    spread the model over GPUs, CPU and disk as transformers does (planned and hooked by accelerate;
    ``converter.loader.placement`` says how CPU and disk modules differ): use them instead of ``device``.

    ``dtype`` is the dtype of the non-quantized parameters (embeddings, norms, head) and, when the
    config has no ``bnb_4bit_compute_dtype``, of the 4-bit matmuls (``torch_dtype=``, its former name
    in transformers, is taken too); ``"auto"`` or None: the checkpoint's, as ``from_pretrained`` picks
    it (config.json's ``dtype``, else the first float tensor's). ``verify`` checks each shard
    against the digests of its index before returning (hashed on background threads while the model
    builds): per 16 MiB chunk its xxh3_128 where the index records one, else its sha256;
    ``verify="sha256"`` checks the sha256 digests (cryptographic, ~30x the hashing cost).
    The model is in eval mode with ``is_loaded_in_4bit = True`` (so PEFT wraps its 4-bit layers with
    its bnb LoRA layer), and ``hf_quantizer`` / ``is_quantized`` as transformers sets them (so its
    Trainer refuses the model without adapters: converter/loader/hf_quantizer.py).

    ``revision``: the branch, tag or commit of a Hub repo id (default: main); ``token``, ``cache_dir``,
    ``force_download`` and ``local_files_only`` go to huggingface_hub's download as ``from_pretrained``
    passes them. A local folder ignores all five, as ``from_pretrained`` does. ``subfolder``: the
    checkpoint is that folder of the local folder or repo (only its files are fetched).
    ``low_cpu_mem_usage`` is accepted and ignored, as transformers 5 ignores it: the model is always
    built on the meta device and filled from the memory-mapped shards. ``use_safetensors`` may be True
    or None (these folders are always safetensors); False, which asks for a pickle checkpoint, is a
    ValueError.

    ``fused_router``: with 4-bit MoE experts, transformers' top-k routers (Qwen2/Qwen3-MoE, OLMoE,
    Mixtral) run softmax, top-k, renormalisation and cast as one op, bit-identical to their own forward
    (``converter.loader.router``); False keeps transformers' forward.

    ``model_class`` (a transformers model class such as ``LlamaForSequenceClassification``, or an Auto
    class such as ``AutoModelForSequenceClassification``) builds that class instead of the folder's
    own, as ``model_class.from_pretrained(folder, **config_kwargs)`` does: ``config_kwargs``
    (``num_labels=3``, ``id2label=...``, ``problem_type=...``) update the config, the ones it has no
    attribute for go to the model's ``__init__``; checkpoint keys gain or lose the base-model prefix;
    parameters the shards lack (the new head) are initialised by the model's ``_init_weights`` on the
    target device, in ``dtype``, with a warning naming them; checkpoint tensors the class has no
    place for are reported as unused. A layer the folder's own class has, that transformers +
    bitsandbytes load quantized and the shards lack, is still an error.
    """
    try:
        import transformers  # noqa: F401  (only to fail early with the install hint)
    except ImportError:
        msg = (
            "load_quantized needs transformers (pip install 'quantize-model[transformers]'); "
            "without it use load_quantized_state / replace_linear_layers"
        )
        raise ModelBuildError(msg) from None

    if use_safetensors is False:
        msg = (
            "use_safetensors=False: a pre-quantized folder holds safetensors shards only; "
            "pass use_safetensors=True or leave it out"
        )
        raise ValueError(msg)
    refuse_gguf_file(config_kwargs)  # before a Hub repo is fetched
    # a GPU this process cannot use (a CPU-only torch, no GPU) or "meta": named now, before any work
    if device_map is None:
        check_device(device, device_argument("device", device))
        ignored = [
            name for name, value in (("max_memory", max_memory), ("offload_folder", offload_folder)) if value
        ]
        if ignored:  # transformers ignores them without a word
            them = " and ".join(f"{n}=" for n in ignored)
            warnings.warn(
                f"{them} {'are' if len(ignored) > 1 else 'is'} ignored without device_map: "
                f'{"they need" if len(ignored) > 1 else "it needs"} device_map ("auto", or a dict) to '
                f"spread the model over devices; the model loads whole on {device}. Pass "
                f'device_map="auto", or leave {"them" if len(ignored) > 1 else "it"} out',
                UserWarning,
                stacklevel=3,
            )
    check_devices_exist(device_map, max_memory)
    forced_isa()  # a bad QM_CPU_ISA is named now, not at the model's first forward
    folder = resolve_folder(
        path_or_repo,
        code=trust_remote_code,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        force_download=force_download,
        local_files_only=local_files_only,
        subfolder=subfolder,
    )
    del low_cpu_mem_usage  # transformers' former switch: loading here is always low-memory
    dtype = requested_dtype(dtype, folder)
    if "torch_dtype" in config_kwargs:  # transformers' former name of dtype, still taken by from_pretrained
        torch_dtype = requested_dtype(config_kwargs.pop("torch_dtype"), folder)
        if dtype not in (torch.bfloat16, torch_dtype):  # bfloat16: dtype's default
            msg = f"pass dtype= only, not also torch_dtype= (its former name): got {dtype} and {torch_dtype}"
            raise TypeError(msg)
        dtype = torch_dtype
    if "quantization_config" in config_kwargs:  # from_pretrained's habit: the folder's own config decides
        given = config_kwargs.pop("quantization_config")
        warnings.warn(
            f"{folder}: quantization_config={type(given).__name__}(...) is ignored: the folder is already "
            "quantized and its own quantization_config (config.json) says how its weights are stored, as "
            "transformers uses a pre-quantized checkpoint's own; remove the argument",
            UserWarning,
            stacklevel=3,
        )
    # With a single target device the shards stream straight into device tensors (loader/stream.py);
    # a device_map keeps the CPU mapping (placement decides per module). The shards are hashed while
    # the model is built (on a first load that includes importing its transformers modules).
    target = device if device_map is None else "cpu"
    # On CUDA a side thread does the first forward's one-time work (warmup.py; off: QM_LOAD_WARMUP=0).
    with (
        warmed(target, folder, dtype) as warm,
        shards_verified(folder, verify, streaming=streams_to(target)) as hashes,
        # a config.json edited since the conversion: one warning (verify=True); named in a load error
        config_edits_named(
            folder, hashes.index if hashes else None, (ModelBuildError, CheckpointMismatchError)
        ) as edited,
    ):
        # the model class is built (meta device) on this thread while the readers stream the shards
        early = EarlyBuild(
            folder,
            dtype,
            trust_remote_code=trust_remote_code,
            model_class=model_class,
            config_kwargs=config_kwargs,
        )
        state = read_state(
            folder, target, hashes, on_parsed=warm.start if warm is not None else None, while_reading=early
        )
        with timing.phase("skeleton"):
            skeleton = build_skeleton(
                folder,
                state,
                dtype,
                trust_remote_code=trust_remote_code,
                experts_device=target,  # 4-bit experts: stacked on the target device
                model_class=model_class,
                config_kwargs=config_kwargs,
                built=early.result(),
            )
        model, qc = skeleton.model, skeleton.quantization_config
        # the path or repo id as given, as from_pretrained sets it (an adapter's base_model_name_or_path)
        model.config.name_or_path = model.name_or_path = os.fspath(path_or_repo)
        cls = type(model)
        with timing.phase("fill"):
            # with a device_map the casts wait for the plan: a disk parameter's never all in RAM at once
            casts: dict[torch.Tensor, torch.dtype] | None = {} if device_map is not None else None
            # a CPU load's tensors are views of the mapped shards: a cast one's pages are dropped after
            mappings = file_mappings(shard_files(folder)[0]) if torch.device(target).type == "cpu" else []
            _convert_16bit(model, state)
            unused = _fill(model, state, str(folder), dtype, casts, mappings) + list(skeleton.dropped)
    timing.mark("built_at")
    _tie_weights(model)
    left = [n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"]
    left += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    refused = [n for n in left if n.rpartition(".")[0] in skeleton.truncated]
    if refused:
        msg = (
            f"{folder}: the shards have no tensor for {len(refused)} quantized model parameter(s): "
            f"{refused[:5]} (layers transformers + bitsandbytes load quantized: a truncated conversion, "
            "or a config.json that does not describe these shards)"
        )
        if note := config_edit_note(edited):
            msg = f"{msg}; {note}"
        raise ModelBuildError(msg)
    recompute = _non_persistent_buffers(model)
    if left or recompute:
        _initialize_missing(model, left, target, recompute)
    if left:
        warnings.warn(
            _new_parameters_warning(folder, cls, left, skeleton.new_quantizable, dtype),
            stacklevel=3,  # the caller of load_quantized, past timing.timed's wrapper
        )
    if unused:
        warnings.warn(
            f"{folder}: {len(unused)} checkpoint tensor(s) unused by {cls.__name__}: {unused[:5]}",
            stacklevel=3,
        )
    if isinstance(qc, dict):
        qc = _skipping(qc, skeleton.new_quantizable, model)
        model.config.quantization_config = transformers_quantization_config(qc)
    records = list(quantized_modules(state).values())  # MoE expert records were taken out by attach_experts
    setattr(model, for_record(records[0]).loaded_flag if records else "is_loaded_in_4bit", True)
    mark_quantized(model)
    # transformers' quantizer attributes: Trainer refuses the model without adapters (hf_quantizer.py)
    from converter.loader.hf_quantizer import attach_quantizer

    attach_quantizer(model)
    model.eval()
    load_generation_config(model, folder, config_kwargs if _is_model_class(model_class) else {})
    bind_dequantize(model)  # model.dequantize(): transformers' needs its quantizer (dequantize_inplace.py)
    # prompt step: lm_head input with standard strides; decode steps: the bf16 head through our CPU GEMV;
    # both kept for a head set_output_embeddings / resize_token_embeddings puts in its place (loader/head.py)
    install_fast_head(model)
    install_footprint(model)
    # before placement: accelerate's hooks wrap the forward the module has then
    fused = fused_router and bool(moe_modules(model)) and bool(router.install(model))
    if device_map is not None:
        place(model, folder, device, device_map, max_memory, offload_folder, casts or {})
    elif torch.device(device) != torch.device("cpu"):
        model.to(device)
    if fused:
        router.prewarm(model)  # the CUDA self-check now, not inside a compile trace or graph capture
    if device_map is None:  # placement hooks may hand each layer its own copy of the input
        group_siblings(model)  # q/k/v and gate/up decode in one launch each (loader/siblings.py)
    for device_type in {m.weight.device.type for m in linear4bit_modules(model).values()}:
        ops.warn_if_slow(device_type)  # no silent slow path: a missing extension or CUDA backend is named
    return model


def requested_dtype(dtype: torch.dtype | str | None, folder: Path) -> torch.dtype:
    """``dtype=`` as ``from_pretrained`` takes it: a torch dtype or its name, or ``"auto"`` / None (what
    ``from_pretrained`` makes of None) for the checkpoint's own, by transformers' rule
    (``converter.plan.tensor_plan.load_dtype``: config.json's ``dtype``, else the first float tensor's
    of the first shard)."""
    if dtype is not None and dtype != "auto":
        return dtype_from_name(dtype)
    from converter.plan.tensor_plan import load_dtype
    from converter.sources.base import TensorInfo
    from formats.reader import open_shard

    config = read_config(folder) or {}
    tensors = []
    if not any(isinstance(config.get(k), str) for k in ("dtype", "torch_dtype")):
        first = min(shard_files(folder)[0])
        with open_shard(first) as shard:
            tensors = [
                TensorInfo(n, first.name, shard.entry(n).dtype, shard.entry(n).shape) for n in shard.keys()
            ]
    name = load_dtype(config, tensors)
    if name is None:
        msg = f"{folder}: dtype={dtype!r}: the checkpoint's dtype is not float32/float16/bfloat16; pass one"
        raise ValueError(msg)
    return dtype_from_name(name)


def load_generation_config(
    model: nn.Module, folder: Path, overrides: Mapping[str, Any] | None = None
) -> None:
    """``model.generation_config`` from ``folder`` as transformers' ``from_pretrained`` sets it: the
    folder's generation_config.json (a chat model's extra EOS ids, its sampling defaults) updated by
    ``overrides``, else the generation parameters of config.json as stored. ``overrides``: the
    keyword arguments a concrete model class's ``from_pretrained`` also hands the generation config
    (an Auto class's go to the config only)."""
    if not (hasattr(model, "can_generate") and model.can_generate()):
        return
    from transformers import GenerationConfig

    path = folder / "generation_config.json"
    if path.is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(folder, **(overrides or {}))
            return
        except OSError as exc:  # not valid JSON: transformers falls back to config.json (silently)
            msg = f"{path}: {exc}; using the generation parameters of config.json, as transformers does"
            warnings.warn(msg, stacklevel=4)  # the caller of load_quantized
    model.generation_config = GenerationConfig.from_pretrained(
        folder, config_file_name="config.json", _from_model_config=True
    )


def place(
    model: nn.Module,
    folder: Path,
    device: str | torch.device,
    device_map: str | int | torch.device | dict[str, int | str],
    max_memory: dict[int | str, int | str] | None,
    offload_folder: str | os.PathLike | None,
    casts: Mapping[torch.Tensor, torch.dtype],
) -> None:
    """Plan and dispatch ``device_map`` with accelerate (``converter.loader.placement``); ``casts``: the
    parameters ``_fill`` left uncast, and their dtypes."""
    if torch.device(device) != torch.device("cpu"):
        msg = f"pass either device={str(device)!r} or device_map=, not both"
        raise ModelBuildError(msg)
    try:
        from converter.loader.placement import dispatch, plan_device_map
    except ImportError:
        msg = "device_map needs accelerate (pip install 'quantize-model[transformers]' or accelerate)"
        raise ModelBuildError(msg) from None
    plan = plan_device_map(model, device_map, max_memory, casts=casts)
    dispatch(model, plan, offload_folder=offload_folder, shard_paths=shard_files(folder)[0], casts=casts)


def linear4bit_modules(model: nn.Module) -> dict[str, QuantLinear4bit]:
    """The 4-bit layers of a model, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear4bit)}
