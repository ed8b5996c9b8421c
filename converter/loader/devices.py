"""Which devices a load may name, checked before any work (no accelerate, no transformers needed).

torch alone would fail later, inside the load, with "AssertionError: Torch not compiled with CUDA
enabled" (a CPU-only build) or an "invalid device ordinal" RuntimeError, after the shards were read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from converter.errors import InputError

#: The device_map strings that ask accelerate for a plan (as transformers accepts them).
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


class PlacementError(InputError):
    """A device / device_map / max_memory / offload request that cannot be honoured."""


class AbsentDeviceError(PlacementError):
    """A GPU (or another accelerator) named that this process does not have: ``what`` says where it was
    named (``max_memory names GPU 0``), ``have`` what there is (``no CUDA device is available here
    (...)``)."""

    def __init__(self, msg: str, what: str, have: str) -> None:
        super().__init__(msg)
        self.what, self.have = what, have


class AbsentDeviceWarning(UserWarning):
    """``estimate`` planned onto a device this process does not have (a plan for another machine)."""


def check_device(device: str | int | torch.device, what: str, *, mapped: bool = False) -> None:
    """``device`` (a torch device, its name, or a GPU index) is one this process can load onto;
    else a PlacementError naming it (``what`` says where it was given; ``mapped``: in a device_map
    or max_memory, where "disk" is a choice too). An int is a GPU index, as torch and transformers take
    it (``device=0``: ``torch.device(0)`` fails in a torch without an accelerator, "Cannot access
    accelerator device when none is available", which named no device)."""
    if isinstance(device, int) and not isinstance(device, bool):
        check_gpu(device, what, mapped=mapped)
        return
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        return  # not a device name: the caller's own checks name it
    if d.type == "meta":
        msg = (
            f"{what}: 'meta' is not a device a quantized model can be loaded onto (its 4-bit/int8 "
            "weights would hold no data); load on 'cpu' or a GPU, or use `inspect --memory` / "
            "converter.loader.estimate.estimate for sizes without loading"
        )
        raise PlacementError(msg)
    if d.type == "cuda":
        check_gpu(d.index or 0, what, mapped=mapped)
    elif d.type != "cpu":
        # Another accelerator (mps, xpu, ...): run by torch's ops where this torch has it, but one it
        # lacks failed deep in the load, after the shards were read (MPS: "Could not run
        # 'aten::empty.memory_format' with arguments from the 'MPS' backend"; XPU: an AssertionError).
        # Only where torch can say (its torch.<type> module): a backend a plugin registers otherwise
        # (privateuseone) is left to torch, as before.
        backend = getattr(torch, d.type, None)
        is_available = getattr(backend, "is_available", None)
        if callable(is_available) and not is_available():
            choices = ["'cpu'", "'disk'"] if mapped else ["'cpu'"]
            if torch.cuda.is_available():
                choices.append("a GPU index" if mapped else "'cuda'")
            devices = " or ".join([", ".join(choices[:-1]), choices[-1]]) if len(choices) > 1 else choices[0]
            have = f"this torch (torch {torch.__version__}) has no {d.type!r} device available"
            msg = f"{what}, but {have}; name only devices that exist ({devices})"
            raise AbsentDeviceError(msg, what, have)


def device_argument(name: str, device: Any) -> str:
    """How an error names the ``name=device`` argument:
    ``device='cuda:1'``; a GPU index, ``device=0 (GPU 0)``."""
    if isinstance(device, int) and not isinstance(device, bool):
        return f"{name}={device} (GPU {device})"
    return f"{name}={str(device)!r}"


def check_gpu(index: int, what: str, *, mapped: bool = True) -> None:
    """A GPU index this process can use; else a PlacementError (accelerate and torch would fail later
    with "Torch not compiled with CUDA enabled" or an index error, after printing warnings)."""
    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    if 0 <= index < count:
        return
    if torch.version.cuda is None:
        have = f"CUDA is not available in this torch build (torch {torch.__version__}, built without CUDA)"
    elif not available:
        have = f"no CUDA device is available here (torch {torch.__version__}, CUDA {torch.version.cuda})"
    else:
        have = f"this process sees {count} GPU(s)"
    choices = ["'cpu'", "'disk'"] if mapped else ["'cpu'"]
    if count:
        choices.append(f"a GPU index below {count}" if mapped else f"'cuda:0' to 'cuda:{count - 1}'")
    devices = " or ".join([", ".join(choices[:-1]), choices[-1]]) if len(choices) > 1 else choices[0]
    msg = f"{what}, but {have}; name only devices that exist ({devices})"
    raise AbsentDeviceError(msg, what, have)


def gpu_index(device: Any) -> int | None:
    """A device_map value / max_memory key given as a GPU index (``1`` or ``"1"``), else None."""
    if isinstance(device, bool):
        return None
    if isinstance(device, int):
        return device
    if isinstance(device, str) and device.isdigit():
        return int(device)
    return None


def check_devices_exist(device_map: Any, max_memory: Mapping[Any, int | str] | None) -> None:
    """Every GPU of ``max_memory`` and of ``device_map`` (a dict, or one device: ``"cuda:0"``) is one
    this process can use (planning itself accepts any index: tests plan several GPUs with CPU stand-ins)."""
    for k in max_memory or {}:
        index = gpu_index(k)
        if index is not None:
            check_gpu(index, f"max_memory names GPU {index}")
        elif isinstance(k, str | torch.device) and k not in ("cpu", "disk"):
            check_device(k, f"max_memory names {str(k)!r}", mapped=True)
    if isinstance(device_map, Mapping):
        for module, device in device_map.items():
            index = gpu_index(device)
            if index is not None:
                check_gpu(index, f"device_map puts {module!r} on GPU {index}")
            elif isinstance(device, str | torch.device) and device not in ("cpu", "disk"):
                check_device(device, f"device_map puts {module!r} on {str(device)!r}", mapped=True)
    elif (index := gpu_index(device_map)) is not None:  # device_map=0: all on GPU 0, as transformers takes it
        check_gpu(index, f"device_map={device_map!r} (GPU {index})")
    elif isinstance(device_map, str | torch.device) and device_map not in STRATEGIES:
        check_device(device_map, f"device_map={str(device_map)!r}", mapped=True)


def absent_device_note(device_map: Any, max_memory: Mapping[Any, int | str] | None) -> str | None:
    """What ``estimate`` says when ``device_map`` / ``max_memory`` name a GPU (or another accelerator) this
    process does not have, where ``load_quantized`` refuses (check_devices_exist): accelerate plans onto it
    all the same (with a "Device 0 is not available" log line), so the plan is one for a machine that has
    it. None when every device named exists."""
    try:
        check_devices_exist(device_map, max_memory)
    except AbsentDeviceError as exc:
        return (
            f"{exc.what}, but {exc.have}: this is the plan on a machine that has it (load_quantized "
            "refuses it here)"
        )
    return None


def device_of(name: str, device_map: Mapping[str, Any]) -> Any:
    """The device of tensor ``name``: its longest module prefix in the map (accelerate's rule)."""
    best, found = -1, None
    for key, device in device_map.items():
        if (key == "" or name == key or name.startswith(f"{key}.")) and len(key) > best:
            best, found = len(key), device
    if found is None:
        msg = f"device_map places no module holding {name!r}; add it (or a parent) to the map"
        raise PlacementError(msg)
    return found
