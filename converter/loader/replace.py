"""Swap the linear layers of any ``nn.Module`` for 4-bit layers read from a checkpoint.

A layer is swapped when the checkpoint holds ``<module name>.weight`` as a quantized record and the
module is an ``nn.Linear`` (exact type, as transformers' ``replace_with_bnb_linear`` checks) or a
GPT-2 style ``Conv1D`` (whose quantized weight is already [out, in]). No transformers needed.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from converter.errors import InputError
from converter.loader.config_file import config_error, read_config
from converter.loader.module import QuantLinear4bit, dtype_from_name
from converter.loader.module_int8 import QuantLinear8bit
from converter.methods import for_record
from formats.record import QuantizedTensor


class CheckpointMismatchError(InputError):
    """The checkpoint's quantized weights do not fit the module they are loaded into."""


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, recognized without importing transformers.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_swappable(module: nn.Module) -> bool:
    """Whether transformers' bnb integration would turn this module into a Linear4bit."""
    return type(module) is nn.Linear or _is_conv1d(module)


def quantization_config_of(folder: Path) -> dict[str, Any]:
    """``quantization_config`` of ``folder/config.json`` ({} without one)."""
    return (read_config(folder) or {}).get("quantization_config") or {}


def compute_dtype_from_config(folder: Path, state: Mapping[str, Any] | None = None) -> torch.dtype | None:
    """The matmul dtype ``folder/config.json`` asks for (``bnb_4bit_compute_dtype`` of a 4-bit folder;
    None for LLM.int8, which computes in the input's dtype), decided by the records' quant method."""
    qc = quantization_config_of(folder)
    method = _method_of(state) if state is not None else None
    if method is None:
        name = qc.get("bnb_4bit_compute_dtype") if qc.get("load_in_4bit", True) else None
    else:
        name = method.compute_dtype(qc)
    if not isinstance(name, str):
        return None
    try:
        return dtype_from_name(name)
    except ValueError as exc:
        raise config_error(folder, "bnb_4bit_compute_dtype", f"is {name!r}: {exc}") from None


def _method_of(state: Mapping[str, Any]) -> Any:
    """The quant method of a loaded state's records (None when it has none)."""
    record = next((v for v in state.values() if not isinstance(v, torch.Tensor)), None)
    return None if record is None else for_record(record)


def quantized_modules(state: Mapping[str, Any]) -> dict[str, QuantizedTensor]:
    """Module name -> record, for every quantized ``<module>.weight`` of a loaded state."""
    return {
        k.removesuffix(".weight"): v
        for k, v in state.items()
        if not isinstance(v, torch.Tensor) and k.endswith(".weight")
    }


def _experts_hint(targets: Mapping[str, QuantizedTensor], modules: Mapping[str, nn.Module]) -> str:
    """What to use instead when the misfits include 4-bit MoE experts this model holds no nn.Linear for
    (transformers' fused experts modules): load_quantized builds those from the records."""
    from converter.plan.moe import is_expert_weight

    if not any(is_expert_weight(f"{n}.weight") and n not in modules for n in targets):
        return ""
    return (
        "; the 4-bit MoE experts among them load with load_quantized, which builds the model's experts "
        "modules from them (replace_linear_layers swaps nn.Linear layers only)"
    )


def swap_layers(
    model: nn.Module,
    state: Mapping[str, Any],
    compute_dtype: torch.dtype | None,
    *,
    where: str = "checkpoint",
    quantization_config: Mapping[str, Any] | None = None,
) -> list[str]:
    """Replace each module named by a quantized weight of ``state``; returns the swapped names.

    The new layers share the record's tensors (memory-mapped shards stay mapped). A bias in
    ``state`` is used; otherwise the module's own bias (if any, and not on the meta device) is kept.
    """
    targets = quantized_modules(state)
    modules = dict(model.named_modules())
    problems = []
    for name, record in targets.items():
        module = modules.get(name)
        if module is None:
            problems.append(f"{record.name!r} has no module {name!r} in the model")
        elif not (is_swappable(module) or isinstance(module, (QuantLinear4bit, QuantLinear8bit))):
            problems.append(
                f"{record.name!r} is quantized but {name!r} is a {type(module).__name__}, not nn.Linear"
            )
        elif tuple(record.shape) != _out_in(module):
            problems.append(
                f"{record.name!r} has shape {list(record.shape)}, the module expects {list(_out_in(module))}"
            )
        elif getattr(module, "bias", None) is None and f"{name}.bias" in state:  # else silently dropped
            problems.append(f"{name + '.bias'!r} is in the checkpoint but module {name!r} has no bias")
    if problems:
        shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        msg = f"{where}: {len(problems)} quantized weight(s) do not fit the model: {shown}"
        raise CheckpointMismatchError(msg + _experts_hint(targets, modules))
    for name, record in targets.items():
        module = modules[name]
        bias = state.get(f"{name}.bias")
        if bias is None and getattr(module, "bias", None) is not None and module.bias.device.type != "meta":
            bias = module.bias.detach()
        has_bias = getattr(module, "bias", None) is not None
        if has_bias and bias is None:
            msg = f"{where}: module {name!r} has a bias but the checkpoint has no {name + '.bias'!r}"
            raise CheckpointMismatchError(msg)
        if has_bias and bias.is_floating_point() and bias.dtype != module.bias.dtype:
            # The model's dtype (dtype=, or config.json's), as from_pretrained casts a Linear4bit's bias:
            # a float32 checkpoint loaded in float16 otherwise kept float32 biases, cast on every call.
            bias = bias.to(module.bias.dtype)
        method = for_record(record)
        layer = method.runtime_layer().from_record(
            record,
            bias=bias if has_bias else None,
            compute_dtype=compute_dtype,
            **method.layer_kwargs(quantization_config or {}),
        )
        layer.train(module.training)
        if _is_conv1d(module):  # model.dequantize() restores it, its weight [in, out] as checkpoints hold it
            layer.conv1d_class = type(module)
        model.set_submodule(name, layer)
    return list(targets)


def _out_in(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, QuantLinear4bit):
        return (module.out_features, module.in_features)
    if _is_conv1d(module):
        return (int(module.weight.shape[1]), int(module.weight.shape[0]))
    return (module.out_features, module.in_features)


def replace_linear_layers(
    module: nn.Module,
    path_or_state: str | Path | Mapping[str, Any],
    *,
    compute_dtype: torch.dtype | str | None = None,
    verify: bool = True,
) -> list[str]:
    """Swap ``module``'s linear layers for 4-bit (or LLM.int8) layers from a checkpoint folder, repo id
    or loaded state.

    Every quantized weight of the checkpoint must name an ``nn.Linear`` of ``module`` with the same
    [out, in] shape (else :class:`CheckpointMismatchError` names them). Biases come from the
    checkpoint. Other tensors (embeddings, norms) are not touched: load them with
    ``module.load_state_dict({k: v for k, v in state.items() if isinstance(v, torch.Tensor)},
    strict=False)`` (the quantized weights are records, ``QuantizedTensor`` / ``Int8Tensor``).
    ``compute_dtype`` defaults to the checkpoint config's ``bnb_4bit_compute_dtype``, else the weights'
    original dtype (int8: the input's); a state from :func:`load_quantized_state` reads the config of
    its folder (``state.folder``) as the folder itself does, another mapping has none. Sets
    ``module.is_loaded_in_4bit = True`` (int8: ``is_loaded_in_8bit``) so PEFT picks its 4-bit (8-bit)
    LoRA layer, ``config._is_quantized`` on the transformers models in ``module``
    (:func:`mark_quantized`), and on the outermost ones
    ``hf_quantizer`` / ``is_quantized`` and ``dequantize()`` as :func:`load_quantized` does (so
    ``Trainer`` refuses the model without adapters, as for bitsandbytes). Returns the names of the
    swapped modules.
    """
    from converter.loader.state import load_quantized_state, resolve_folder

    where = "state dict"
    qc: dict[str, Any] = {}
    if isinstance(path_or_state, Mapping):
        state = path_or_state
        # load_quantized_state's dict knows its folder: the config's compute dtype and int8 threshold
        # apply as for the folder itself (they were lost: the weights' dtype and 6.0 instead, silently)
        folder = getattr(state, "folder", None)
    else:
        folder = resolve_folder(path_or_state)
        state = load_quantized_state(folder, verify=verify)
    if folder is not None:
        where = str(folder)
        qc = quantization_config_of(folder)
        if compute_dtype is None:
            compute_dtype = compute_dtype_from_config(folder, state)
    dtype = dtype_from_name(compute_dtype) if compute_dtype is not None else None
    names = swap_layers(module, state, dtype, where=where, quantization_config=qc)
    if names:
        setattr(module, _method_of(state).loaded_flag, True)
        mark_quantized(module)
        _attach_quantizers(module)
    return names


def mark_quantized(module: nn.Module) -> None:
    """``config._is_quantized = True`` on the config of every transformers model in ``module``, as
    transformers' quantizers set it: FalconMamba and Jamba then call ``dt_proj`` instead of multiplying
    by its weight, and flash attention casts float32 queries to ``config.dtype`` instead of a Linear
    weight's dtype. Without transformers' modeling_utils imported no module is one of its models."""
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    if modeling_utils is None:
        return
    for sub in module.modules():
        if isinstance(sub, modeling_utils.PreTrainedModel):
            sub.config._is_quantized = True


def _outermost(module: nn.Module, cls: type) -> list[nn.Module]:
    """The modules of type ``cls`` in ``module`` (itself included) that no other such module holds."""
    if isinstance(module, cls):
        return [module]
    return [found for child in module.children() for found in _outermost(child, cls)]


def _attach_quantizers(module: nn.Module) -> None:
    """transformers' quantizer attributes and our ``dequantize()`` on the outermost transformers models
    in ``module`` that have no quantizer yet (converter/loader/hf_quantizer.py): a model swapped here
    is refused by ``Trainer`` without adapters, where training failed in the first backward."""
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    if modeling_utils is None:
        return
    from converter.loader.dequantize_inplace import bind_dequantize
    from converter.loader.hf_quantizer import attach_quantizer

    for model in _outermost(module, modeling_utils.PreTrainedModel):
        if getattr(model, "hf_quantizer", None) is None:
            attach_quantizer(model)
            bind_dequantize(model)
