"""CUDA tests: skipped unless this build has the CUDA backend and a usable GPU."""

from __future__ import annotations

import pytest
import torch


def cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    try:
        from converter.kernels import bnb4bit_cuda as kernels_cuda
    except ImportError as exc:  # extension not built yet
        return f"converter._kernels is not importable: {exc}"
    usable, why = kernels_cuda.cuda_status()
    return None if usable else why


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = None
    checked = False
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            if not checked:
                reason, checked = cuda_skip_reason(), True
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"CUDA backend not usable: {reason}"))
