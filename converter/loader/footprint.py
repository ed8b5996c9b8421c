"""Bytes a loaded model holds, counted the way they are held: a 4-bit layer by its real record bytes.

transformers' ``get_memory_footprint`` multiplies ``numel`` by the element size of every parameter and
buffer; for a 4-bit layer that sees only the packed codes and misses the absmax, the maps and the
nested scales (12.5% more for NF4 with blocksize 64). Here a :class:`QuantLinear4bit`'s weight counts
``module.nbytes(layer)`` (codes, absmax, quant maps, offset), every tensor is counted once (tied weights
share one), and a meta tensor counts what it will hold once filled (the skeleton ``inspect --memory``
sizes). The same function sizes accelerate's plan, so the estimate and the measured footprint agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch import nn

from converter.loader.file_mappings import file_mappings, inside
from converter.loader.module import QuantLinear4bit, nbytes
from converter.loader.module_int8 import QuantLinear8bit
from converter.loader.moe import QuantExperts4bit


def module_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, int]]:
    """(qualified name, tensor, bytes) of every parameter and buffer, each tensor object once."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for attr, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            if isinstance(module, QuantLinear4bit) and attr == "weight":
                size = nbytes(module)
            elif isinstance(module, QuantLinear8bit) and attr == "weight":
                size = t.numel() + module.scb.numel() * 4  # int8 codes + float32 SCB
            else:
                size = t.numel() * t.element_size()
            yield prefix + attr, t, size


def host_copies(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, int]]:
    """(name, tensor, bytes) of the host tensors modules keep besides their parameters and buffers: a 4-bit
    experts layer's nested scales as the folder holds them (``QuantExperts4bit.nested_buffers``: kept on
    the CPU for saving, never read by the forward; 1/64 byte per weight). Host memory wherever the layer
    runs, so a device map never places them."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, QuantExperts4bit):
            continue
        for key, t in (module.nested_buffers() or {}).items():
            if id(t) not in seen:
                seen.add(id(t))
                yield f"{module_name}._nested.{key}", t, t.numel() * t.element_size()


def memory_footprint(model: nn.Module, return_buffers: bool = True) -> int:
    """Bytes of parameters (and buffers, and the experts' host copies) of ``model``; the 4-bit weights at
    their real size."""
    held = sum(
        size
        for name, _, size in module_tensors(model)
        if return_buffers or _is_parameter(model, name) or _is_quantized_weight(model, name)
    )
    return held + (sum(size for _, _, size in host_copies(model)) if return_buffers else 0)


def memory_by_device(model: nn.Module) -> dict[str, int]:
    """Bytes held per device: ``"cuda:0"``, ``"cpu"``, and ``"disk"`` for tensors of modules the
    device map sent to disk (still mapped from the shards, released after each use; a parameter cast
    since, ``model.half()``, is a copy and counts under its device)."""
    disk = [n for n, d in (getattr(model, "hf_device_map", None) or {}).items() if d == "disk"]
    files = getattr(model, "_qm_disk_files", None)  # set by placement.dispatch
    mapped: Callable[[torch.Tensor], bool] | None = None
    if disk and files is not None:  # a tensor cast after the load (model.half()) is a copy in RAM
        mappings = file_mappings(files)

        def mapped(t: torch.Tensor) -> bool:
            return inside(t, mappings)

    out: dict[str, int] = {}
    for name, t, size in module_tensors(model):
        on_disk = any(name == m or name.startswith(f"{m}.") or m == "" for m in disk)
        if on_disk and mapped is not None and _is_parameter(model, name):  # buffers stay in RAM at load
            on_disk = mapped(t)
        key = "disk" if on_disk else str(t.device)
        out[key] = out.get(key, 0) + size
    for _, _, size in host_copies(model):
        out["cpu"] = out.get("cpu", 0) + size
    return out


def _is_parameter(model: nn.Module, name: str) -> bool:
    module_name, _, attr = name.rpartition(".")
    return attr in model.get_submodule(module_name)._parameters


def _is_quantized_weight(model: nn.Module, name: str) -> bool:
    module_name, _, attr = name.rpartition(".")
    return attr == "weight" and isinstance(
        model.get_submodule(module_name), (QuantLinear4bit, QuantLinear8bit)
    )


def parameter_count(model: nn.Module, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    """transformers' ``num_parameters`` with the quantized weights counted by their ``[out, in]`` shape
    (a MoE experts module: ``E · 3 · I · H``). They are buffers of our layers, which transformers' count
    (``named_parameters``) never sees; they are frozen, so ``only_trainable`` leaves them out as
    transformers + bitsandbytes does."""
    embeddings = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    total = sum(
        p.numel()
        for name, p in model.named_parameters()
        if not (exclude_embeddings and name in embeddings)
        and (p.requires_grad or not only_trainable)
        and not _is_quantized_weight(model, name)  # a parameter once PEFT merged into it: counted below
    )
    if only_trainable:
        return total
    for module in model.modules():
        if isinstance(module, (QuantLinear4bit, QuantLinear8bit)):
            total += module.out_features * module.in_features
        elif isinstance(module, QuantExperts4bit):
            total += module.num_experts * 3 * module.intermediate_dim * module.hidden_dim
            for bias in ("gate_up_bias", "down_bias"):  # gpt-oss's expert biases (buffers beside the codes)
                b = getattr(module, bias, None)
                total += b.numel() if isinstance(b, torch.Tensor) else 0
    return total


def _get_memory_footprint(self: nn.Module, return_buffers: bool = True) -> int:
    return memory_footprint(self, return_buffers)


def _num_parameters(self: nn.Module, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    return parameter_count(self, only_trainable, exclude_embeddings)


def install_footprint(model: nn.Module) -> None:
    """Make ``model.get_memory_footprint()`` count the 4-bit layers at their real size, and
    ``model.num_parameters()`` count the quantized weights.

    Bound with ``functools.partial`` to module-level functions, which pickle by name: methods bound to
    local functions were pickled as ``getattr(model, name)``, so a model saved with ``torch.save`` came
    back from ``torch.load`` with transformers' own two methods (the quantized weights left out of
    ``num_parameters()``, the 4-bit layers counted short), silently."""
    model.get_memory_footprint = partial(_get_memory_footprint, model)
    model.num_parameters = partial(_num_parameters, model)
