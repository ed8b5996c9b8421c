"""``device_map`` / ``max_memory`` / disk offload for a loaded 4-bit model, planned and hooked by accelerate.

Planning is accelerate's: ``get_balanced_memory`` / ``get_max_memory`` and ``infer_auto_device_map``
run on a *size mirror* of the model (:func:`size_proxy`: the same module tree and class names, each
tensor a ``uint8`` meta tensor of its real bytes), so a 4-bit layer weighs its codes + absmax + maps
rather than ``numel`` of its packed buffer, and tied weights stay one tensor.

Dispatch differs from ``accelerate.dispatch_model`` in one deliberate way: modules mapped to ``"cpu"``
or ``"disk"`` *execute on the CPU* with our CPU kernels (their 4-bit codes never copied to a GPU, never
decoded to a float copy), instead of being streamed to the main GPU at every forward. Everything else
is accelerate's: ``attach_align_device_hook_on_blocks`` moves activations between the devices of
consecutive blocks (any number of GPUs) and back to the input's device at the end.

Disk offload needs no second copy: every weight is already a view of a memory-mapped shard. A module
mapped to ``"disk"`` keeps its views; after each of its forwards an accelerate hook drops the mapped
pages it touched (``madvise(MADV_DONTNEED)``, Linux), so they leave the process's RSS until the next
use reads them again from the page cache or the file. Only pages wholly inside a mapping of a shard
(or of ``offload_folder``) are ever dropped; a parameter of a disk module that is *not* a shard view
(cast to another dtype at load) is written once to a new folder of this load inside ``offload_folder``
with accelerate's ``offload_weight`` and mapped from there (another load's files, mapped by its model,
are never overwritten; the folder is removed when the model is freed).
"""

from __future__ import annotations

import os
import shutil
import types
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.hooks import ModelHook, add_hook_to_module, attach_align_device_hook_on_blocks
from accelerate.utils import (
    check_device_map,
    find_tied_parameters,
    get_balanced_memory,
    get_max_memory,
    infer_auto_device_map,
    offload_weight,
    set_module_tensor_to_device,
)
from torch import nn

from converter.loader.devices import STRATEGIES, PlacementError, device_of, gpu_index
from converter.loader.file_mappings import drop_pages, file_mappings, inside, page_ranges, unwritten_runs
from converter.loader.footprint import host_copies, module_tensors
from converter.loader.module import QuantLinear4bit
from converter.loader.module_int8 import QuantLinear8bit
from converter.loader.moe import QuantExperts4bit, _is_fused_experts
from converter.locks import locked_temp_folder, remove_if_unlocked

Device = int | str
DeviceMap = dict[str, Device]


# -- planning ---------------------------------------------------------------------------------------------
def size_proxy(model: nn.Module, casts: Mapping[torch.Tensor, torch.dtype] | None = None) -> nn.Module:
    """A meta-device mirror of ``model`` that accelerate can size: same module names and class names
    (``no_split_module_classes`` match by name), each tensor a ``uint8`` meta tensor of its real bytes,
    tied tensors one object (accelerate's ``find_tied_parameters`` keeps them on one device).
    ``casts``: parameters still to be cast at dispatch, sized in their dtype."""
    casts = casts or {}
    sizes = {
        id(t): t.numel() * casts[t].itemsize if t in casts else size for _, t, size in module_tensors(model)
    }
    classes: dict[str, type] = {}
    proxies: dict[int, torch.Tensor] = {}

    def proxy_of(t: torch.Tensor, parameter: bool) -> torch.Tensor:
        if id(t) not in proxies:
            empty = torch.empty(sizes[id(t)], dtype=torch.uint8, device="meta")
            proxies[id(t)] = nn.Parameter(empty, requires_grad=False) if parameter else empty
        return proxies[id(t)]

    def mirror(module: nn.Module) -> nn.Module:
        name = type(module).__name__
        cls = classes.setdefault(name, type(name, (nn.Module,), {}))
        out = cls()
        for attr, t in module._parameters.items():
            if t is not None:
                out._parameters[attr] = proxy_of(t, True)
        for attr, t in module._buffers.items():
            if t is not None:
                out._buffers[attr] = proxy_of(t, False)
        for attr, child in module._modules.items():
            if child is not None:
                out._modules[attr] = mirror(child)
        return out

    return mirror(model)


def _no_split(model: nn.Module) -> list[str]:
    return list(getattr(model, "_no_split_modules", None) or [])


def normalize_max_memory(max_memory: Mapping[Any, int | str] | None) -> dict[Device, int | str] | None:
    """``{"0": "30GiB"}`` -> ``{0: "30GiB"}`` (CLI and JSON give GPU indices as strings)."""
    if max_memory is None:
        return None
    out: dict[Device, int | str] = {}
    for key, value in max_memory.items():
        k: Device = int(key) if isinstance(key, str) and key.isdigit() else key
        if isinstance(k, str) and k not in ("cpu", "disk", "mps"):
            try:
                d = torch.device(k)
            except RuntimeError:
                pass  # accelerate's get_max_memory names the unknown key
            else:
                k = (d.index or 0) if d.type == "cuda" else k
        out[k] = value
    return out


def plan_device_map(
    model: nn.Module,
    device_map: str | int | torch.device | Mapping[str, Device],
    max_memory: Mapping[Any, int | str] | None = None,
    *,
    casts: Mapping[torch.Tensor, torch.dtype] | None = None,
) -> DeviceMap:
    """The module -> device map for ``device_map`` ("auto", "balanced", "balanced_low_0",
    "sequential", a dict, or one device: a GPU index too), sized by the real bytes of every tensor of
    ``model`` (those in ``casts`` in the dtype :func:`dispatch` will cast them to)."""
    if isinstance(device_map, Mapping):
        if max_memory is not None:
            msg = "max_memory applies to device_map='auto'/'balanced'/'sequential', not to an explicit dict"
            raise PlacementError(msg)
        # JSON (the CLI) gives GPU indices as strings
        plan = {k: int(v) if isinstance(v, str) and v.isdigit() else v for k, v in device_map.items()}
        check_map(model, plan)
        return plan
    index = gpu_index(device_map)
    if index is not None:  # a GPU index: the whole model on that GPU, as transformers takes it
        return {"": index}
    if device_map not in STRATEGIES:
        try:
            device = torch.device(device_map)
        except (RuntimeError, TypeError):
            msg = f"device_map={device_map!r}: expected one of {', '.join(STRATEGIES)}, a dict or a device"
            raise PlacementError(msg) from None
        return {"": str(device)}
    memory = normalize_max_memory(max_memory)
    proxy = size_proxy(model, casts)
    no_split = _no_split(model)
    try:
        if device_map == "sequential":
            budget = get_max_memory(dict(memory) if memory is not None else None)
        else:
            # accelerate's get_balanced_memory calls torch.device() on every key and fails on "disk"
            # (a RuntimeError): balance the other devices, then give the disk entry back
            # (infer_auto_device_map never limits the disk).
            rest = {k: v for k, v in memory.items() if k != "disk"} if memory is not None else None
            budget = get_balanced_memory(
                proxy,
                max_memory=rest,
                no_split_module_classes=no_split,
                low_zero=device_map == "balanced_low_0",
            )
            if memory is not None and "disk" in memory:
                budget = {**budget, "disk": get_max_memory({"disk": memory["disk"]})["disk"]}
        return infer_auto_device_map(proxy, max_memory=budget, no_split_module_classes=no_split)
    except ValueError as exc:  # accelerate's messages name the bad device / size
        msg = f"device_map={device_map!r}, max_memory={max_memory!r}: {exc}"
        raise PlacementError(msg) from exc


def _unmapped(model: nn.Module, device_map: Mapping[str, Device]) -> tuple[list[str], int]:
    """(the largest modules, or single tensors, none of whose tensors ``device_map`` gives a device, in
    model order; how many tensors that is). A key covers a tensor it names or a dotted prefix of."""
    if "" in device_map:
        return [], 0
    names = list(model.state_dict())

    def prefixes(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]

    missing = [n for n in names if not any(p in device_map for p in prefixes(n))]
    lost = set(missing)
    # modules holding a mapped tensor must be named by their children, not as a whole
    mixed = {p for n in names if n not in lost for p in prefixes(n)[:-1]}
    top = [next((p for p in prefixes(n) if p not in mixed), n) for n in missing]
    return list(dict.fromkeys(top)), len(missing)


def _unknown_keys(model: nn.Module, device_map: Mapping[str, Device]) -> list[str]:
    """Keys of ``device_map`` naming no module, parameter or buffer of ``model`` ('' names the model)."""
    names = {name for name, _ in model.named_modules(remove_duplicate=False)}
    names |= {name for name, _ in model.named_parameters(remove_duplicate=False)}
    names |= {name for name, _ in model.named_buffers(remove_duplicate=False)}
    return [k for k in device_map if k not in names]


def check_map(model: nn.Module, device_map: Mapping[str, Device]) -> None:
    """Every tensor mapped (accelerate's check_device_map) and tied weights on one device."""
    unmapped, count = _unmapped(model, device_map)
    if unmapped:  # accelerate lists every tensor (and a 4-bit weight's five buffers) in one line
        more = f" and {len(unmapped) - 5} more" if len(unmapped) > 5 else ""
        unknown = _unknown_keys(model, device_map)
        hint = f"; no module is named {', '.join(map(repr, unknown))}" if unknown else ""
        msg = (
            f"device_map gives no device to {', '.join(map(repr, unmapped[:5]))}{more} ({count} tensors)"
            f"{hint}; map them, a parent module, or '' (everything not listed) to a device"
        )
        raise PlacementError(msg)
    unknown = _unknown_keys(model, device_map)
    if unknown:  # a typo: dispatch would fail on it (a disk or GPU entry) or ignore it (a CPU one)
        msg = (
            f"device_map: no module or tensor is named {', '.join(map(repr, unknown))}; "
            "use the names of model.named_modules()"
        )
        raise PlacementError(msg)
    try:
        check_device_map(model, dict(device_map))
    except ValueError as exc:
        msg = f"device_map: {exc}"
        raise PlacementError(msg) from exc
    for group in find_tied_parameters(model):
        where = {name: device_of(name, device_map) for name in group}
        if len(set(where.values())) > 1:
            msg = f"device_map puts tied weights on different devices {where}; map them to one device"
            raise PlacementError(msg)


def bytes_per_device(model: nn.Module, device_map: Mapping[str, Device]) -> dict[str, int]:
    """What each device of ``device_map`` will hold ("cuda:0", "cpu", "disk": the keys of
    ``footprint.memory_by_device`` on the loaded model), from the same real sizes the plan used."""
    out: dict[str, int] = {}
    for name, _, size in module_tensors(model):
        device = device_of(name, device_map)
        key = "disk" if device == "disk" else str(accelerator_device(device))
        out[key] = out.get(key, 0) + size
    for _, _, size in host_copies(model):  # host memory wherever their layer runs
        out["cpu"] = out.get("cpu", 0) + size
    return out


# -- dispatch ---------------------------------------------------------------------------------------------
def accelerator_device(device: Device) -> torch.device:
    """The torch device a device_map value executes on: GPU index ``i`` -> ``cuda:i``, "cpu"/"disk" -> cpu."""
    if device in ("cpu", "disk"):
        return torch.device("cpu")
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device)


def dispatch(
    model: nn.Module,
    device_map: Mapping[str, Device],
    *,
    offload_folder: str | os.PathLike | None = None,
    shard_paths: Iterable[Path] = (),
    execution_device: Callable[[Device], torch.device] = accelerator_device,
    casts: Mapping[torch.Tensor, torch.dtype] | None = None,
) -> None:
    """Place ``model``'s modules per ``device_map`` and attach accelerate's hooks.

    ``shard_paths`` are the files the weights are mapped from (disk modules release their pages).
    ``execution_device`` turns a map value into the torch device it runs on; tests give a CPU
    stand-in for GPU indices so the several-device path runs on a machine without GPUs.
    ``casts``: parameters (shard views) to cast to their dtype here, one at a time, each on its device;
    a disk one is cast, written to ``offload_folder`` and mapped back before the next is cast.
    """
    device_map = dict(device_map)
    casts = casts or {}
    check_map(model, device_map)
    run_on = {name: execution_device(dev) for name, dev in device_map.items()}
    _cast_resident(model, device_map, run_on, casts, file_mappings(shard_paths) if casts else [])
    for name, device in run_on.items():
        if device.type == "cpu":
            continue  # already there: the shards are mapped in host memory
        if _is_module(model, name):
            model.get_submodule(name).to(device)  # QuantLinear4bit moves codes + quant state, never casts
        else:
            set_module_tensor_to_device(model, name, device)

    disk = [name for name, dev in device_map.items() if dev == "disk"]
    paths = [Path(p) for p in shard_paths]
    written = _offload_unmapped(model, device_map, paths, offload_folder, casts) if disk else None
    if written is not None:
        paths.append(written)
    mappings = file_mappings(paths) if disk else []

    if len(set(device_map.values())) > 1 or disk:
        main = next((d for d in run_on.values() if d.type != "cpu"), torch.device("cpu"))
        attach_align_device_hook_on_blocks(
            model,
            execution_device={"": main, **run_on},
            offload=dict.fromkeys(device_map, False),
            skip_keys=getattr(model, "_skip_keys_device_placement", None),
            tied_params_map={},
        )
    for name in disk:
        is_module = _is_module(model, name)
        targets = _release_points(model.get_submodule(name), name, set(_no_split(model))) if is_module else []
        for module_name, module in targets or [(name, None)]:
            tensors = _tensors_under(model, module_name)
            hook = ReleaseMappedPages(page_ranges(tensors, mappings), tensors)
            hook.release()  # pages touched while loading; each forward re-reads what it needs
            if module is not None and hook.ranges:
                add_hook_to_module(module, hook, append=True)
    model.hf_device_map = device_map
    if disk:
        model._qm_disk_files = tuple(paths)  # what "disk" reads: memory_by_device, casts_leave_disk
        model._apply = types.MethodType(_apply, model)
        for method in (resize_token_embeddings, set_output_embeddings, set_input_embeddings):
            if hasattr(type(model), method.__name__):
                setattr(model, method.__name__, types.MethodType(method, model))
        for name in disk:  # a cast of the entry or of a module above it (model.lm_head.half()) runs these
            if name and _is_module(model, name):
                entry = model.get_submodule(name)
                entry.__dict__["_qm_disk_entry"] = (name, device_map, model._qm_disk_files)
                entry._apply = types.MethodType(_apply, entry)


def _apply(self: nn.Module, fn: Callable, recurse: bool = True) -> nn.Module:
    """``_apply`` of a model with disk modules and of each module its map sends to disk (``to(dtype)``,
    ``half()``, ``float()``, ``to(device)`` all run it, also on a submodule): the class's own, then
    :func:`casts_leave_disk`. Named as the method it shadows, so a pickled bound method resolves on the
    unpickled model."""
    out = type(self)._apply(self, fn, recurse)
    casts_leave_disk(self)
    return out


def resize_token_embeddings(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """transformers' ``resize_token_embeddings`` of a model with disk modules: it puts new embedding / head
    modules in RAM (their page-dropping hooks moved onto them), so :func:`casts_leave_disk` then updates
    ``hf_device_map`` as after a cast (a disk ``lm_head`` said "disk", counted under "cpu" by
    ``memory_by_device``). Named as the method it shadows, as :func:`_apply` is."""
    out = type(self).resize_token_embeddings(self, *args, **kwargs)
    casts_leave_disk(self)
    return out


def set_output_embeddings(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """transformers' ``set_output_embeddings`` of a model with disk modules: the head it is given is not
    read from the files (in RAM, or on a GPU), so :func:`casts_leave_disk` updates ``hf_device_map`` as
    after :func:`resize_token_embeddings` (a disk ``lm_head`` kept saying "disk")."""
    from converter.loader.head import keep_fast_head

    out = type(self).set_output_embeddings(self, *args, **kwargs)
    casts_leave_disk(self)
    keep_fast_head(self)  # the loader's wrapper it replaces (loader/head.py): the new head stays fast
    return out


def set_input_embeddings(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``set_input_embeddings`` likewise (a disk ``embed_tokens`` replaced)."""
    out = type(self).set_input_embeddings(self, *args, **kwargs)
    casts_leave_disk(self)
    return out


def casts_leave_disk(model: nn.Module) -> None:
    """``hf_device_map`` after ``model.to(dtype)`` / ``.half()`` (``model`` the loaded model, or a module
    its map sends to disk: ``model.lm_head.half()``): a disk entry none of whose tensors is a view of the
    shards (or of the offload folder) any more, its weights all cast into copies, says where the copies are
    (``"cpu"``, or the GPU index), and its page-dropping hooks let go of the old views. An entry whose
    4-bit weights (never cast) are still read from the files stays ``"disk"``; its cast tensors (norms,
    biases) count under their device in ``memory_by_device``. The map is updated in place: the entries'
    modules hold it."""
    entry = model.__dict__.get("_qm_disk_entry")
    if entry is not None:  # one module of the map, cast by itself or with a module above it
        name, device_map, files = entry
        if device_map.get(name) == "disk":
            _leave_disk(model, "", name, device_map, file_mappings(files))
        return
    device_map = getattr(model, "hf_device_map", None)
    files = getattr(model, "_qm_disk_files", None)
    if not device_map or files is None or "disk" not in device_map.values():
        return
    mappings = file_mappings(files)
    for name, device in list(device_map.items()):
        if device == "disk":
            _leave_disk(model, name, name, device_map, mappings)


def _leave_disk(
    root: nn.Module, path: str, name: str, device_map: dict[str, Device], mappings: list[tuple[int, int]]
) -> None:
    """:func:`casts_leave_disk` for the disk entry ``name``: the module or tensor at ``path`` under
    ``root``."""
    tensors = [t for t in _tensors_under(root, path) if t.numel()]
    module = root.get_submodule(path) if _is_module(root, path) else None
    weights = (
        module is None
        or any(True for _ in module.parameters())
        or any(isinstance(m, QuantLinear4bit | QuantLinear8bit | QuantExperts4bit) for m in module.modules())
    )
    devices = {t.device for t in tensors}
    if not weights or len(devices) != 1 or any(inside(t, mappings) for t in tensors):
        return
    (where,) = devices
    device_map[name] = (
        "cpu" if where.type == "cpu" else where.index if where.index is not None else str(where)
    )
    for m in module.modules() if module is not None else ():
        hook = getattr(m, "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]):
            if isinstance(h, ReleaseMappedPages):
                h.ranges, h.tensors = [], []  # nothing of it is mapped: the old views may go


def _release_points(module: nn.Module, name: str, no_split: set[str]) -> list[tuple[str, nn.Module]]:
    """The modules under a disk entry after whose forward its pages are dropped: the entry itself and,
    down to the blocks (``_no_split_modules``, e.g. decoder layers), every module below it, so while the
    model runs one block's pages are resident, not the whole entry's (accelerate maps a model no layer
    of which fits the budget as ``{"": "disk"}``). Containers (ModuleList/ModuleDict) are never called."""
    out = [] if isinstance(module, nn.ModuleList | nn.ModuleDict) else [(name, module)]
    if type(module).__name__ not in no_split:
        for child_name, child in module.named_children():
            out += _release_points(child, f"{name}.{child_name}" if name else child_name, no_split)
    return out


def _is_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _tensors_under(model: nn.Module, name: str) -> list[torch.Tensor]:
    """Every tensor a module (or the one tensor) named in the map holds, quant-state tensors included."""
    if not _is_module(model, name):
        module_name, _, attr = name.rpartition(".")
        return [getattr(model.get_submodule(module_name), attr)]
    out = []
    for module in model.get_submodule(name).modules():
        out += [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
        if isinstance(module, QuantLinear4bit):
            s = module.weight.quant_state
            out += [s.absmax, s.code] + ([s.state2.absmax, s.state2.code] if s.nested else [])
        elif isinstance(module, QuantLinear8bit):
            out.append(module.scb)
    return out


_OFFLOAD_PREFIX = "qm-offload-"


def _own_offload_folder(offload_folder: Path) -> tuple[Path, int]:
    """A new folder of this load's own inside ``offload_folder`` and the descriptor of its flock, held
    while the model lives; first the folders of loads whose process was killed before it could remove
    them (their lock gone with it) are removed: nothing else ever would."""
    offload_folder.mkdir(parents=True, exist_ok=True)
    for stale in sorted(offload_folder.glob(_OFFLOAD_PREFIX + "*")):
        remove_if_unlocked(stale)
    return locked_temp_folder(offload_folder, _OFFLOAD_PREFIX)


def _remove_offload_folder(folder: Path, lock: int) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    os.close(lock)  # the lock goes once the folder is gone


def _holders(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id of each parameter -> every (module, attribute) holding it (a tied parameter: several)."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((module, attr))
    return holders


def _cast_resident(
    model: nn.Module,
    device_map: Mapping[str, Device],
    run_on: Mapping[str, torch.device],
    casts: Mapping[torch.Tensor, torch.dtype],
    mappings: list[tuple[int, int]],
) -> None:
    """The parameters of ``casts`` that ``device_map`` keeps off the disk, cast one by one straight on
    the device they run on (a GPU one never has a cast copy in RAM), each one's shard pages (in
    ``mappings``) dropped after its cast; disk ones are left to :func:`_offload_unmapped`."""
    if not casts:
        return
    holders = _holders(model)
    for name, t, _ in list(module_tensors(model)):
        if t not in casts or device_of(name, device_map) == "disk":
            continue
        param = nn.Parameter(t.detach().to(device_of(name, run_on), casts[t]), requires_grad=False)
        drop_pages(page_ranges([t], mappings))  # the shard's bytes: read once, for the cast
        for holder, holder_attr in holders[id(t)]:  # tied weights stay one tensor
            holder._parameters[holder_attr] = param


def _offload_unmapped(
    model: nn.Module,
    device_map: Mapping[str, Device],
    shard_paths: list[Path],
    offload_folder: str | os.PathLike | None,
    casts: Mapping[torch.Tensor, torch.dtype] | None = None,
) -> Path | None:
    """Parameters of disk modules that are not shard views (cast at load, or MoE experts stacked at
    load: a 4-bit experts module's ``packed`` / ``absmax`` buffers too, its weights), and those of
    ``casts`` (shard views still to be cast, cast here one at a time), go to a new folder inside
    ``offload_folder`` through accelerate's ``offload_weight`` and are mapped back from there; that
    folder, or None when nothing was written. One folder per load: a second model loaded with the
    same ``offload_folder`` has parameters of the same names, and rewriting a file the first model maps
    would change its weights under it."""
    casts = casts or {}
    mappings = file_mappings(shard_paths)
    holders = _holders(model)  # a tied parameter: every module holding it
    folder: Path | None = None
    for name, t, _ in list(module_tensors(model)):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        stacked = isinstance(module, QuantExperts4bit) and attr in ("packed", "absmax")
        weight = attr in module._parameters or stacked
        if not weight or device_of(name, device_map) != "disk" or (inside(t, mappings) and t not in casts):
            continue  # buffers stay in RAM (accelerate's offload_buffers=False); shard views stay views
        if offload_folder is None:
            why = (
                "the experts of a layer are stacked at load"
                if stacked or _is_fused_experts(module)
                else f"it was cast to {casts.get(t, t.dtype)} at load; or load with the shards' dtype"
            )
            msg = (
                f"device_map sends {name!r} to disk but it is not a view of the shards ({why}); "
                "pass offload_folder= to write it there"
            )
            raise PlacementError(msg)
        if folder is None:
            # absolute: the finalizer runs after any chdir of the process (mkdtemp keeps a relative base)
            folder, lock = _own_offload_folder(Path(offload_folder).absolute())
            weakref.finalize(model, _remove_offload_folder, folder, lock)
        data = t.detach().to(casts[t]) if t in casts else t.detach()  # one cast copy alive at a time
        info = offload_weight(data, name, str(folder), index={})[name]
        stored = np.memmap(
            folder / f"{name}.dat", dtype=_NUMPY_DTYPES.get(info["dtype"], info["dtype"]), mode="c"
        )
        mapped = torch.from_numpy(stored).view(data.dtype).reshape(t.shape)
        del data
        if t in casts:
            drop_pages(page_ranges([t], mappings))  # the shard's bytes: read once, for the cast
        if stacked:
            module._buffers[attr] = mapped
            module._prepare()  # the keyed op reads the mapped buffers, not the RAM copies
            continue
        param = nn.Parameter(mapped, requires_grad=False)
        for holder, holder_attr in holders[id(t)]:  # tied weights stay one tensor, none left in RAM
            holder._parameters[holder_attr] = param
    return folder


#: accelerate's offload_weight stores dtypes numpy lacks as same-width integers.
_NUMPY_DTYPES = {"bfloat16": "int16"}


# -- releasing the mapped pages of disk modules ----------------------------------------------------------
class ReleaseMappedPages(ModelHook):
    """After each forward of a disk module, drop its mapped shard pages from the process (``MADV_DONTNEED``
    on a private file mapping: the next access reads them from the page cache or file). Pages written in
    place since the load (a LoRA merged into a 16-bit disk layer) are the only copy of what was written:
    they are kept, in RAM (:func:`~converter.loader.file_mappings.unwritten_runs`).

    It holds ``tensors``, the mapped tensors ``ranges`` cover, so their mappings live as long as it does:
    once the module's tensors are replaced (``model.to(dtype)``) a shard may otherwise be unmapped and
    its address range reused by another mapping, whose pages ``MADV_DONTNEED`` would zero."""

    def __init__(self, ranges: list[tuple[int, int]], tensors: Iterable[torch.Tensor] = ()) -> None:
        self.ranges = ranges
        self.tensors = [t.detach() for t in tensors]  # the storages: `.to()` swaps a parameter's data

    def release(self) -> None:
        drop_pages(run for start, end in self.ranges for run in unwritten_runs(start, end))

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        self.release()
        return output
