"""The check every GPU benchmark makes first: without a usable GPU it stops at once, before writing any
checkpoint, with one line that says why (exit status 1), not a traceback from inside torch, and never
times the CPU under a CUDA label."""

from __future__ import annotations

import sys
from pathlib import Path


def cuda_problem(torch_free: bool = False) -> str | None:
    """Why the converter's CUDA backend cannot run here, or None when it can. ``torch_free``: ask the
    torch-free host check alone (``--device cuda`` conversions; the caller does not import torch)."""
    if torch_free:
        from converter.quantize.cuda_host import cuda_status
    else:
        from converter.kernels.bnb4bit_cuda import cuda_status
    usable, why = cuda_status()
    return None if usable else why


def require_cuda(script: str, torch_free: bool = False) -> None:
    """Exit with ``<script> needs a CUDA GPU ...: <why>`` when :func:`cuda_problem` finds one."""
    why = cuda_problem(torch_free)
    if why is not None:
        sys.exit(f"{Path(script).name} needs a CUDA GPU and the converter's CUDA backend: {why}")
