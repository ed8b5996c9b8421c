"""The device plan and bytes per device that ``load_quantized(folder, device_map=...)`` would make,
without reading weight data (``quantize-model inspect --memory``).

Its own module because it needs both the model skeleton (``converter.loader.model``) and the planner
(``converter.loader.placement``); ``model`` imports ``placement`` (lazily: accelerate is optional), so
``placement`` must not import ``model`` back.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from converter.loader.model import build_skeleton
from converter.loader.module import dtype_from_name
from converter.loader.placement import Device, DeviceMap, bytes_per_device, plan_device_map
from converter.loader.state import load_quantized_state, resolve_folder

__all__ = ["estimate"]


def estimate(
    folder: str | os.PathLike,
    device_map: str | Mapping[str, Device] = "auto",
    max_memory: Mapping[Any, int | str] | None = None,
    dtype: torch.dtype | str = torch.bfloat16,
    *,
    trust_remote_code: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    subfolder: str = "",
) -> tuple[DeviceMap, dict[str, int]]:
    """The plan ``load_quantized(folder, device_map=..., max_memory=...)`` makes and the bytes each
    device will hold, from the shard headers and the meta skeleton alone (no weight data is read).
    A Hub repo id is fetched at ``revision`` with ``token``, ``cache_dir``, ``force_download`` and
    ``local_files_only`` as ``load_quantized`` fetches it, but only its JSON files (and code): the
    shards' headers are read by HTTP range requests (offline or with ``local_files_only``, the cached
    snapshot is read instead); ``subfolder``: the checkpoint is that folder."""
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
    model = build_skeleton(
        path,
        state,
        dtype_from_name(dtype),
        trust_remote_code=trust_remote_code,
        experts_device="meta" if headers_only else "cpu",  # meta tensors have no data to move
    ).model
    model.tie_weights()  # tied weights count once, as in the loaded model
    plan = plan_device_map(model, device_map, max_memory)
    return plan, bytes_per_device(model, plan)
