"""``load_quantized``: a transformers model built from a pre-quantized folder, without bitsandbytes' loader.

1. ``config.json`` -> the class named by ``architectures`` (else the head the shards fill: the
   converter's lookup, ``converter.plan.model_class``), built with its parameters on the meta device
   (buffers such as rotary tables are computed for real);
2. every module whose ``<name>.weight`` is quantized in the shards becomes a :class:`Linear4bit`
   sharing the memory-mapped tensors; this is checked against the set transformers' bnb integration
   would swap (``llm_int8_skip_modules`` or its default skips) and a difference is reported;
3. the other tensors are assigned from the shards (still mapped when the dtype already matches,
   cast otherwise), weights are tied, and anything left on the meta device is an error naming it.

transformers is imported here only; the state API and ``replace_linear_layers`` work without it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from converter.errors import InputError
from converter.kernels.isa_env import forced_isa
from converter.loader import ops, router, timing
from converter.loader.config_file import read_config
from converter.loader.dequantize_model import bind_dequantize
from converter.loader.devices import check_device, check_devices_exist
from converter.loader.footprint import install_footprint
from converter.loader.head import flatten_head_input, use_gemv_head
from converter.loader.module import QuantLinear4bit, dtype_from_name
from converter.loader.moe import attach_experts, moe_modules
from converter.loader.replace import compute_dtype_from_config, is_swappable, quantized_modules, swap_layers
from converter.loader.siblings import group_siblings
from converter.loader.state import read_state, resolve_folder, shard_files, shards_verified, streams_to
from converter.loader.warmup import BUILD_LOCK, warmed
from converter.methods import for_record


class ModelBuildError(InputError):
    """transformers cannot build the model named by config.json, or the shards do not fill it."""


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


def _model_class(
    config: Any,
    folder: Path | None = None,
    *,
    trust_remote_code: bool = False,
    keys: Collection[str] | None = None,
) -> type:
    """The class to build: the converter's lookup (``converter.plan.model_class``: the class named by
    ``architectures``, the same head for a name transformers lacks, else the head the checkpoint
    ``keys`` fill), then repository code when trusted."""
    from converter.plan.model_class import model_class

    cls = model_class(config, getattr(config, "architectures", None) or (), keys)
    if cls is not None:
        return cls
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and folder is not None:
        # repository code (config.json "auto_map"), run only because the caller trusts it
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        for auto in ("AutoModelForCausalLM", "AutoModel"):
            if isinstance(auto_map.get(auto), str):
                return get_class_from_dynamic_module(auto_map[auto], str(folder))
    msg = f"transformers has no model class for model_type {config.model_type!r}"
    if auto_map and not trust_remote_code:
        msg += " (config.json names repository code in auto_map: pass trust_remote_code=True to run it)"
    raise ModelBuildError(msg)


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


def _fill(model: nn.Module, state: dict[str, Any], where: str) -> list[str]:
    """Assign the non-quantized tensors; returns checkpoint keys the model has no slot for."""
    params = dict(model.named_parameters(remove_duplicate=False))  # both names of a tied pair
    buffers = dict(model.named_buffers())
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
        data = value if value.dtype == target.dtype else value.to(target.dtype)
        module = model.get_submodule(module_name)
        if key in params:
            module._parameters[attr] = nn.Parameter(data, requires_grad=False)
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


def build_skeleton(
    folder: Path,
    state: dict[str, Any],
    dtype: torch.dtype,
    *,
    trust_remote_code: bool = False,
    experts_device: str | torch.device = "cpu",
) -> tuple[nn.Module, dict | None]:
    """The model of ``folder/config.json`` with its parameters on the meta device and every quantized
    module already a :class:`Linear4bit` sharing ``state``'s mapped tensors; and the quantization_config.

    Nothing but shard headers is read: ``inspect --memory`` sizes a placement from this skeleton.
    """
    import transformers

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

    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we build the 4-bit layers ourselves
    cls = _model_class(config, folder, trust_remote_code=trust_remote_code, keys=list(state))
    try:
        with BUILD_LOCK, _params_on_meta(), _no_init_weights(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls._from_config(config, dtype=dtype)
    except Exception as exc:
        why = f"{type(exc).__name__}: {exc}"
        msg = f"{folder}: transformers could not build {cls.__name__} from config.json ({why})"
        raise ModelBuildError(msg) from exc

    # MoE experts (loader/moe.py): takes the per-expert tensors out of `state`, renames e.g. Mixtral's router
    attach_experts(model, state, compute_dtype, where=str(folder), device=experts_device)
    _match_prefix(model, state)
    try:
        expected: set[str] | None = transformers_would_quantize(model, qc if isinstance(qc, dict) else None)
    except (ImportError, AttributeError, TypeError):  # another transformers version: skip the check
        expected = None
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
            stacklevel=3,
        )
    return model, qc if isinstance(qc, dict) else None


@timing.timed  # QM_LOAD_TIMING=1: the phases on stderr (loader/timing.py)
def load_quantized(
    path_or_repo: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.bfloat16,
    *,
    verify: bool | str = True,
    trust_remote_code: bool = False,
    device_map: str | dict[str, int | str] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | os.PathLike | None = None,
    fused_router: bool = True,
) -> nn.Module:
    """A transformers model from a pre-quantized folder (or Hub repo id), ready for ``generate()``.

    ``device_map`` ("auto", "balanced", "balanced_low_0", "sequential" or a dict module -> GPU index /
    "cpu" / "disk"), ``max_memory`` and ``offload_folder`` spread the model over GPUs, CPU and disk
    as transformers does (planned and hooked by accelerate; ``converter.loader.placement`` says how
    CPU and disk modules differ): use them instead of ``device``.

    ``dtype`` is the dtype of the non-quantized parameters (embeddings, norms, head) and, when the
    config has no ``bnb_4bit_compute_dtype``, of the 4-bit matmuls. ``verify`` checks each shard
    against the digests of its index before returning (hashed on background threads while the model
    builds): per 16 MiB chunk its xxh3_128 where the index records one, else its sha256;
    ``verify="sha256"`` checks the sha256 digests (cryptographic, ~30x the hashing cost).
    The model is in eval mode with ``is_loaded_in_4bit = True`` (so PEFT wraps its 4-bit layers with
    its bnb LoRA layer).

    ``fused_router``: with 4-bit MoE experts, transformers' top-k routers (Qwen2/Qwen3-MoE, OLMoE,
    Mixtral) run softmax, top-k, renormalisation and cast as one op, bit-identical to their own forward
    (``converter.loader.router``); False keeps transformers' forward.
    """
    try:
        import transformers  # noqa: F401  (only to fail early with the install hint)
    except ImportError:
        msg = (
            "load_quantized needs transformers (pip install 'quantize-model[transformers]'); "
            "without it use load_quantized_state / replace_linear_layers"
        )
        raise ModelBuildError(msg) from None

    # a GPU this process cannot use (a CPU-only torch, no GPU) or "meta": named now, before any work
    if device_map is None:
        check_device(device, f"device={str(device)!r}")
    check_devices_exist(device_map, max_memory)
    forced_isa()  # a bad QM_CPU_ISA is named now, not at the model's first forward
    folder = resolve_folder(path_or_repo)
    dtype = dtype_from_name(dtype)
    # With a single target device the shards stream straight into device tensors (loader/stream.py);
    # a device_map keeps the CPU mapping (placement decides per module). The shards are hashed while
    # the model is built (on a first load that includes importing its transformers modules).
    target = device if device_map is None else "cpu"
    # On CUDA a side thread does the first forward's one-time work (warmup.py; off: QM_LOAD_WARMUP=0).
    with (
        warmed(target, folder, dtype) as warm,
        shards_verified(folder, verify, streaming=streams_to(target)) as hashes,
    ):
        state = read_state(folder, target, hashes, on_parsed=warm.start if warm is not None else None)
        with timing.phase("skeleton"):
            model, qc = build_skeleton(
                folder, state, dtype, trust_remote_code=trust_remote_code, experts_device=target
            )  # 4-bit experts: stacked on the target device
        cls = type(model)
        with timing.phase("fill"):
            unused = _fill(model, state, str(folder))
    timing.mark("built_at")
    _tie_weights(model)
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    left += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if left:
        msg = f"{folder}: the shards have no tensor for {len(left)} model parameter(s): {left[:5]}"
        raise ModelBuildError(msg)
    if unused:
        warnings.warn(
            f"{folder}: {len(unused)} checkpoint tensor(s) unused by {cls.__name__}: {unused[:5]}",
            stacklevel=2,
        )
    if isinstance(qc, dict):
        model.config.quantization_config = qc
    records = list(quantized_modules(state).values())  # MoE expert records were taken out by attach_experts
    setattr(model, for_record(records[0]).loaded_flag if records else "is_loaded_in_4bit", True)
    model.eval()
    bind_dequantize(model)  # model.dequantize(): transformers' needs its own quantizer (dequantize_model.py)
    flatten_head_input(model)  # prompt step: lm_head input with standard strides (loader/head.py)
    use_gemv_head(model)  # decode steps: the bf16 head through our CPU GEMV (loader/head.py)
    install_footprint(model)
    # before placement: accelerate's hooks wrap the forward the module has then
    fused = fused_router and bool(moe_modules(model)) and bool(router.install(model))
    if device_map is not None:
        place(model, folder, device, device_map, max_memory, offload_folder)
    elif torch.device(device) != torch.device("cpu"):
        model.to(device)
    if fused:
        router.prewarm(model)  # the CUDA self-check now, not inside a compile trace or graph capture
    if device_map is None:  # placement hooks may hand each layer its own copy of the input
        group_siblings(model)  # q/k/v and gate/up decode in one launch each (loader/siblings.py)
    for device_type in {m.weight.device.type for m in linear4bit_modules(model).values()}:
        ops.warn_if_slow(device_type)  # no silent slow path: a missing extension or CUDA backend is named
    return model


def place(
    model: nn.Module,
    folder: Path,
    device: str | torch.device,
    device_map: str | dict[str, int | str],
    max_memory: dict[int | str, int | str] | None,
    offload_folder: str | os.PathLike | None,
) -> None:
    """Plan and dispatch ``device_map`` with accelerate (``converter.loader.placement``)."""
    if torch.device(device) != torch.device("cpu"):
        msg = f"pass either device={str(device)!r} or device_map=, not both"
        raise ModelBuildError(msg)
    try:
        from converter.loader.placement import dispatch, plan_device_map
    except ImportError:
        msg = "device_map needs accelerate (pip install 'quantize-model[transformers]' or accelerate)"
        raise ModelBuildError(msg) from None
    plan = plan_device_map(model, device_map, max_memory)
    dispatch(model, plan, offload_folder=offload_folder, shard_paths=shard_files(folder)[0])


def linear4bit_modules(model: nn.Module) -> dict[str, QuantLinear4bit]:
    """The 4-bit layers of a model, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear4bit)}
