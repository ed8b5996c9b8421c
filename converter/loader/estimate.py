"""The device plan and bytes per device that ``load_quantized(folder, device_map=...)`` would make,
without reading weight data (``quantize-model inspect --memory``).

Its own module because it needs both the model skeleton (``converter.loader.model``) and the planner
(``converter.loader.placement``); ``model`` imports ``placement`` (lazily: accelerate is optional), so
``placement`` must not import ``model`` back.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from converter.loader.devices import AbsentDeviceWarning, absent_device_note
from converter.loader.model import UnexpectedArgumentError, build_skeleton, dtype_plan, requested_dtype
from converter.loader.placement import Device, DeviceMap, bytes_per_device, plan_device_map
from converter.loader.state import load_quantized_state, resolve_folder

__all__ = ["estimate"]


def estimate(
    folder: str | os.PathLike,
    device_map: str | Mapping[str, Device] = "auto",
    max_memory: Mapping[Any, int | str] | None = None,
    dtype: torch.dtype | str | None = torch.bfloat16,
    *,
    trust_remote_code: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    subfolder: str = "",
    model_class: type | None = None,
    **config_kwargs: Any,
) -> tuple[DeviceMap, dict[str, int]]:
    """The plan ``load_quantized(folder, device_map=..., max_memory=...)`` makes and the bytes each
    device will hold, from the shard headers and the meta skeleton alone (no weight data is read).
    ``dtype`` as ``load_quantized`` takes it ("auto" / None: the checkpoint's).
    A Hub repo id is fetched at ``revision`` with ``token``, ``cache_dir``, ``force_download`` and
    ``local_files_only`` as ``load_quantized`` fetches it, but only its JSON files (and code): the
    shards' headers are read by HTTP range requests (offline or with ``local_files_only``, the cached
    snapshot is read instead); ``subfolder``: the checkpoint is that folder.
    ``model_class`` and ``config_kwargs`` as ``load_quantized`` takes them: the skeleton planned is that
    class (its modules, its ``_no_split_modules``), the config updated with ``config_kwargs``
    (``num_labels=3``), new parameters (a head the shards lack) sized in ``dtype``.
    A GPU (or another accelerator) that ``device_map`` / ``max_memory`` name and this process does not
    have (``max_memory={0: "20GiB"}`` on a CPU-only machine) is planned all the same, as accelerate plans
    it, with an ``AbsentDeviceWarning`` (converter.loader.devices) saying so: the plan is the one on a
    machine that has that device, where ``load_quantized`` raises a PlacementError here."""
    from huggingface_hub import constants

    # A Hub repo (online): its JSON files, and the shards' headers by range requests; no shard is fetched.
    headers_only = not Path(folder).expanduser().exists() and not (
        local_files_only or constants.is_offline_mode()
    )
    path = resolve_folder(
        folder,
        code=trust_remote_code,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        force_download=force_download,
        local_files_only=local_files_only,
        subfolder=subfolder,
        weights=not headers_only,
    )
    if headers_only:
        from converter.loader.hub_headers import header_state

        state = header_state(str(folder), path, subfolder, token)
    else:
        state = load_quantized_state(path, verify=False)
    dtype = requested_dtype(dtype, path)  # "auto" / None: the checkpoint's, as load_quantized takes them
    if "torch_dtype" in config_kwargs:  # dtype's former name, as load_quantized takes it
        torch_dtype = requested_dtype(config_kwargs.pop("torch_dtype"), path)
        if dtype not in (torch.bfloat16, torch_dtype):
            msg = f"pass dtype= only, not also torch_dtype= (its former name): got {dtype} and {torch_dtype}"
            raise TypeError(msg)
        dtype = torch_dtype
    # 4-bit MoE experts stacked as meta tensors: their sizes without reading (or holding) their bytes
    try:
        skeleton = build_skeleton(
            path,
            state,
            dtype,
            trust_remote_code=trust_remote_code,
            experts_device="meta",
            model_class=model_class,
            config_kwargs=config_kwargs,
        )
    except UnexpectedArgumentError as exc:  # named as estimate's, not load_quantized's
        msg = str(exc).replace("load_quantized()", "estimate()", 1).replace(" load_quantized ", " estimate ")
        raise UnexpectedArgumentError(msg) from None
    model = skeleton.model
    _apply_dtype_plan(model, state, dtype)
    model.tie_weights()  # tied weights count once, as in the loaded model
    note = absent_device_note(device_map, max_memory)
    if note is None:
        plan = plan_device_map(model, device_map, max_memory)
    else:  # planned all the same (a plan for the machine that has it), said once, in our words
        warnings.warn(note, AbsentDeviceWarning, stacklevel=2)
        with _accelerate_absent_device_lines_dropped():
            plan = plan_device_map(model, device_map, max_memory)
    return plan, bytes_per_device(model, plan)


class _DropAbsentDevice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "is not available, available devices are" not in record.getMessage()


@contextmanager
def _accelerate_absent_device_lines_dropped() -> Iterator[None]:
    """Without accelerate's "Device 0 is not available, available devices are []" (logged once per
    get_max_memory call, twice a plan): the AbsentDeviceWarning says it."""
    logger = logging.getLogger("accelerate.utils.modeling")
    drop = _DropAbsentDevice()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _apply_dtype_plan(model: nn.Module, state: Mapping[str, Any], dtype: torch.dtype) -> None:
    """Give the skeleton's meta tensors the dtype the load gives them (``model._fill``): transformers'
    dtype plan (``_keep_in_fp32_modules`` under float16, e.g. T5's ``wo``) for the checkpoint's floats."""
    planned = dtype_plan(model, dtype)
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        target = params.get(key, buffers.get(key))
        wanted = planned(key)
        if target is None or wanted is None or wanted == target.dtype:
            continue
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name)
        meta = torch.empty(target.shape, dtype=wanted, device="meta")
        if key in params:
            module._parameters[attr] = nn.Parameter(meta, requires_grad=False)
        else:
            module._buffers[attr] = meta
