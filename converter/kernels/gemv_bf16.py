"""Dense GEMV of a bfloat16 weight on CPU (``csrc/gemv_bf16.cpp``), as a function and a torch custom op.

For the plain lm_head of a 4-bit model in decode: at batch 1 torch's bf16 matmul on CPU reads the
[vocab, hidden] weight at about a third of the memory bandwidth, and that head is half of the bytes
the model reads per token (SmolLM2-135M: 57 of 113 MB). The kernel widens each bf16 weight exactly to
float32 and accumulates in float32, so its result is within gamma_K * sum|x w| (plus the output's
rounding) of the exact dot product, the same bound torch's own float32-accumulating matmul meets.

``quantize_model::gemv_bf16(x [B, K], w [O, K]) -> y [B, O]`` (x's dtype) is the same kernel as one
graph node for torch.compile.
"""

# No ``from __future__ import annotations``: torch.library reads the real type hints for the schema.

import torch

from converter import _kernels
from converter.kernels.checks import GEMV_MAX_BATCH, KERNEL_DTYPE_NAMES
from converter.kernels.cpu_threads import gemv_threads
from converter.kernels.custom_ops import define


def gemv_bf16(
    x: torch.Tensor, w: torch.Tensor, *, isa: str = "auto", threads: int | None = None
) -> torch.Tensor:
    """``y = x @ w.T`` for x [B, K] (B = 1..8, float32/float16/bfloat16, CPU) and w [O, K] bfloat16.

    y has x's dtype. ``threads`` None: the loader's GEMV thread policy (``cpu_threads.gemv_threads``).
    """
    if x.device.type != "cpu" or w.device.type != "cpu":
        msg = f"gemv_bf16 runs on CPU tensors; got x on {x.device}, w on {w.device}"
        raise ValueError(msg)
    if w.dtype != torch.bfloat16 or w.dim() != 2:
        msg = f"w must be a 2-D bfloat16 [out, in] weight, got {w.dtype} of shape {tuple(w.shape)}"
        raise ValueError(msg)
    if x.dim() != 2 or not 1 <= x.shape[0] <= GEMV_MAX_BATCH or x.shape[1] != w.shape[1]:
        msg = f"x has shape {tuple(x.shape)}: gemv_bf16 takes [1..{GEMV_MAX_BATCH}, {w.shape[1]}]"
        raise ValueError(msg)
    if x.dtype not in KERNEL_DTYPE_NAMES:
        msg = f"x has dtype {x.dtype}: expected float32, float16 or bfloat16"
        raise ValueError(msg)
    x, w = x.contiguous(), w.contiguous()
    y = torch.empty((x.shape[0], w.shape[0]), dtype=x.dtype)
    if threads is None:
        threads = gemv_threads(w.numel() * 2)
    _kernels.gemv_bf16(
        x.data_ptr(), KERNEL_DTYPE_NAMES[x.dtype], x.shape[0], w.shape[1], w.shape[0], w.data_ptr(),
        y.data_ptr(), isa, threads,
    )  # fmt: skip
    return y


def _gemv_bf16_cpu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return gemv_bf16(x, w)


def _gemv_bf16_fake(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], w.shape[0]))


gemv_bf16_op = define("gemv_bf16", _gemv_bf16_cpu, _gemv_bf16_fake)
