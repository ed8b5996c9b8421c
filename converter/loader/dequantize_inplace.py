"""``model.dequantize()``: a loaded model's quantized modules back to torch's own, in memory.

transformers + bitsandbytes models have ``model.dequantize(dtype)`` (its quantizer swaps each
``Linear4bit`` / ``Linear8bitLt`` for an ``nn.Linear`` holding the dequantized weight, then drops the
quantization config). A model from :func:`converter.load_quantized` has no transformers quantizer, so
that method would only say "You need to first quantize your model": the loader binds
:func:`dequantize_model` in its place. It swaps

- each 4-bit / int8 linear (:class:`QuantLinear4bit`, :class:`QuantLinear8bit`) for an ``nn.Linear``
  with the weight its kernels compute with (bitsandbytes' decode, bit for bit), the same bias (one that
  replaced a GPT-2 ``Conv1D`` for that ``Conv1D`` again, its weight ``[in, out]`` as checkpoints store it);
- each 4-bit MoE experts module (:class:`QuantExperts4bit`) for transformers' own experts module, kept
  on the meta device when the model was built, with its ``gate_up_proj`` / ``down_proj`` filled (Llama 4's
  :class:`QuantLlama4Experts4bit` for a fused ``Llama4TextExperts``, gpt-oss's
  :class:`QuantGptOssExperts4bit` for ``GptOssExperts`` with its biases: ``x @ W`` orientation;
  NemotronH's :class:`QuantUngatedExperts4bit` with its ``up_proj`` / ``down_proj``);
- Llama 4's 16-bit per-expert experts (``SequentialLlama4TextExperts``, as transformers and the loader
  build them for a pre-quantized folder) for transformers' fused ``Llama4TextExperts`` again, its
  ``gate_up_proj [E, H, 2I]`` / ``down_proj [E, I, H]`` stacked from the per-expert linears;

on the device each weight is on, in ``dtype`` (default: the model's ``config.dtype``, as transformers; after
a ``.half()`` / ``.float()`` / ``.to(dtype)`` of the loaded model, the dtype its parameters were cast to).
The model's logits are then those of the folder's ``quantize-model dequantize`` output loaded by plain
transformers. New parameters are frozen like the rest of a loaded model (``requires_grad_()`` to train).

For a plain checkpoint on disk without loading the model, use ``quantize-model dequantize`` (streams
tensor by tensor). Not handled: modules whose weights accelerate offloads to CPU or disk (refused:
load without a ``device_map``) and 4-bit layers wrapped by PEFT adapters (refused: ``merge_and_unload()``
first, or dequantize before adding adapters).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from converter.loader.devices import device_of
from converter.loader.module import QuantLinear4bit, dtype_from_name
from converter.loader.module_int8 import QuantLinear8bit
from converter.loader.moe import SOURCE_MODULE, QuantExperts4bit
from converter.loader.moe_gpt_oss import QuantGptOssExperts4bit
from converter.loader.moe_llama4 import QuantLlama4Experts4bit
from converter.loader.moe_ungated import QuantUngatedExperts4bit


class DequantizeError(ValueError):
    """A model this in-memory dequantize cannot convert (the message says what to do instead)."""


def _dtype(model: nn.Module, dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is not None:
        return dtype_from_name(dtype)
    dtype = getattr(getattr(model, "config", None), "dtype", None)
    dtype = None if dtype is None else dtype_from_name(dtype)
    # .half() / .float() / .to(dtype) after the load (torch's casts, which transformers refuses on a
    # bitsandbytes model) leave config.dtype as loaded: the linears then take the dtype every other
    # floating-point parameter holds, else the model would mix them ("expected m1 and m2 to have the
    # same dtype"); a model still holding config.dtype anywhere (fp32-kept modules) keeps it
    held = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(held) == 1 and dtype not in held:
        return held.pop()
    return dtype


def _check_swappable(name: str, weight: torch.Tensor, on_disk: bool) -> None:
    if name.endswith(".base_layer") or name == "base_layer":
        msg = (
            f"dequantize(): {name!r} is wrapped by a PEFT adapter; call merge_and_unload() (or unload()) "
            "first, or dequantize before adding adapters"
        )
        raise DequantizeError(msg)
    if weight.device.type == "meta" or on_disk:  # ours on disk: shard pages mapped, not meta
        msg = (
            f"dequantize(): the weights of {name!r} are offloaded by accelerate (device_map); load the "
            "folder without a device_map to dequantize in memory, or run `quantize-model dequantize` on it"
        )
        raise DequantizeError(msg)


def _move_hook(old: nn.Module, new: nn.Module) -> None:
    """accelerate's hook (a device_map's device alignment) goes with the module it wrapped."""
    hook = getattr(old, "_hf_hook", None)
    if hook is None:
        return
    from accelerate.hooks import add_hook_to_module, remove_hook_from_module

    remove_hook_from_module(old)
    add_hook_to_module(new, hook)


def _dense_linear(module: QuantLinear4bit | QuantLinear8bit, dtype: torch.dtype | None) -> nn.Module:
    if isinstance(module, QuantLinear8bit):
        weight = module.dequantize(dtype or module.compute_dtype or torch.float32)
    else:
        weight = module.dequantize(dtype)
    conv1d = getattr(module, "conv1d_class", None)  # a GPT-2 Conv1D it replaced: [in, out] weight again
    with torch.device("meta"):
        if conv1d is not None:
            linear = conv1d(module.out_features, module.in_features)
            weight = weight.t().contiguous()
        else:
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        bias = module.bias if dtype is None else module.bias.to(dtype)
        linear.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return linear


def _dense_experts(name: str, module: QuantExperts4bit, dtype: torch.dtype | None) -> nn.Module:
    source: Any = module.__dict__.get(SOURCE_MODULE)
    if source is None:
        msg = f"dequantize(): {name!r} was not built by load_quantized (no experts module to restore)"
        raise DequantizeError(msg)
    dtype = dtype or module.dtype
    # fused x @ W (+ biases), or up/down without a gate (NemotronH): the layer builds its module
    if isinstance(module, (QuantLlama4Experts4bit, QuantGptOssExperts4bit, QuantUngatedExperts4bit)):
        return module.dense_module(dtype)
    pairs = [module.expert_weights(e, dtype) for e in range(module.num_experts)]
    source.gate_up_proj = nn.Parameter(torch.stack([gu for gu, _ in pairs]), requires_grad=False)
    source.down_proj = nn.Parameter(torch.stack([dn for _, dn in pairs]), requires_grad=False)
    return source


def _sequential_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Llama 4's per-expert experts modules (converter.plan.selection.patch_for_bnb) of ``model``."""
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ == "SequentialLlama4TextExperts"]


def _fused_llama4_experts(module: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """transformers' ``Llama4TextExperts`` holding the weights of the per-expert MLPs ``module``
    (``gate_up_proj[e] = cat([gate.W.T, up.W.T], 1)``, ``down_proj[e] = down.W.T``)."""
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    from converter.sources.llama4 import fused_block

    weights = [(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight) for mlp in module]
    dtype = dtype or weights[0][0].dtype
    with torch.device("meta"):
        fused = Llama4TextExperts(module[0].config)
    gate_up = torch.stack([fused_block((g, u)) for g, u, _ in weights]).to(dtype)
    down = torch.stack([fused_block((d,)) for _, _, d in weights]).to(dtype)
    fused.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
    fused.down_proj = nn.Parameter(down, requires_grad=False)
    return fused


def dequantize_model(model: nn.Module, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Swap every quantized module of ``model`` for torch's own (in place) and return ``model``.

    ``dtype``: of the dequantized weights (default ``model.config.dtype``, or the dtype every floating-point
    parameter was cast to after the load when that is another one). The model afterwards has no
    ``quantization_config`` nor ``config._is_quantized``, no ``hf_quantizer`` and is not ``is_quantized``,
    ``is_loaded_in_4bit`` nor ``is_loaded_in_8bit``, so ``save_pretrained`` writes a plain checkpoint
    and ``Trainer`` takes it without adapters.
    """
    dtype = _dtype(model, dtype)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, (QuantLinear4bit, QuantLinear8bit, QuantExperts4bit))
    ]
    device_map = getattr(model, "hf_device_map", None) or {}
    for name, module in targets:  # every refusal before the first swap: never half dequantized
        weight = module.packed if isinstance(module, QuantExperts4bit) else module.weight
        _check_swappable(name, weight, bool(device_map) and device_of(name, device_map) == "disk")
    sequential = _sequential_experts(model)
    for name, module in sequential:
        for sub, linear in module.named_modules():
            weight = getattr(linear, "weight", None)
            if isinstance(weight, torch.Tensor) and not isinstance(
                linear, (QuantLinear4bit, QuantLinear8bit)
            ):
                where = f"{name}.{sub}"
                _check_swappable(where, weight, bool(device_map) and device_of(where, device_map) == "disk")
    if not targets:
        warnings.warn("dequantize(): the model has no quantized modules; nothing changed", stacklevel=2)
    for name, module in targets:
        if isinstance(module, QuantExperts4bit):
            new = _dense_experts(name, module, dtype)
        else:
            new = _dense_linear(module, dtype)
        new.train(module.training)  # an eval model stays in eval mode throughout
        _move_hook(module, new)
        model.set_submodule(name, new)
    for name, module in sequential:  # after its linears: they hold the dequantized weights now
        new = _fused_llama4_experts(module, dtype)
        new.train(module.training)
        _move_hook(module, new)
        model.set_submodule(name, new)
    from converter.loader.head import GemvHead, drop_fast_head

    drop_fast_head(model)  # a head set later stays plain too
    for module in model.modules():  # the load's bf16 GEMV head: plain F.linear, as transformers' head
        if type(module) is GemvHead:  # (on 1..8 tokens its logits differed from the plain model's)
            module.__class__ = nn.Linear
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for module in model.modules():  # the load's flag (FalconMamba, Jamba branch on it): plain forwards now
        sub_config = getattr(module, "config", None)
        if sub_config is not None and "_is_quantized" in vars(sub_config):
            del sub_config._is_quantized
    # the load's flags and transformers' quantizer attributes (loader/hf_quantizer.py), on the model and
    # on the transformers models inside one (replace_linear_layers sets them there): a plain model now
    flags = ("is_loaded_in_4bit", "is_loaded_in_8bit", "hf_quantizer", "is_quantized", "half", "float")
    for module in model.modules():
        for flag in flags:
            if flag in module.__dict__:
                delattr(module, flag)
    return model


class _BoundDequantize:
    """``model.dequantize``: an object, not a closure or bound method, so that ``copy.deepcopy`` and
    pickling a model keep it pointing at that model (the copy's, the unpickled one's)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, dtype: torch.dtype | str | None = None) -> nn.Module:
        return dequantize_model(self.model, dtype)


def bind_dequantize(model: nn.Module) -> None:
    """``model.dequantize(dtype=None)`` calls :func:`dequantize_model` (transformers' method needs its
    own quantizer, which a model from load_quantized does not have)."""
    model.dequantize = _BoundDequantize(model)  # type: ignore[method-assign]
