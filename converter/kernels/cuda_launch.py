"""Launch arguments every CUDA kernel wrapper passes: a tensor's device index and torch's current stream.

Kept free of ``converter._kernels`` so that modules importable without the extension
(``converter.loader.moe_cuda``) share it with the kernel wrappers (``bnb4bit_cuda``, ``int8_cuda``).
"""

from __future__ import annotations

import torch


def device_index(device: torch.device) -> int:
    """The CUDA device index of ``device`` (``cuda`` without an index: torch's current device)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def current_stream(device: torch.device) -> int:
    """The raw cudaStream_t of torch's current stream on ``device``.

    Called only at launch time, outside dynamo's tracing: the launches run inside the real
    implementations of custom ops (``converter.kernels.custom_ops``, the MoE experts op), which
    torch.compile treats as opaque.
    """
    return torch._C._cuda_getCurrentRawStream(device_index(device))  # what inductor's generated code calls
