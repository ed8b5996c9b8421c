"""The plain (not quantized) lm_head of a loaded model: standard-stride input, and a faster bf16 GEMV on CPU.

Prompt step: transformers keeps the last position of the hidden states, ``hidden[:, -1:, :]`` ([B, 1, H]
with the prompt's strides). ``F.linear`` on that 3-D view does not fold it into one matrix product: it
goes through ``bmm`` and copies the transposed [vocab, H] weight on every call (SmolLM2-135M, 2-core
VM: ~140 ms against ~13 ms for the same input with standard strides, most of the time to first token).
A forward pre-hook re-views the input as [N, H] and back, which gives standard strides (a copy of the
few KB of activations only when B > 1). Same values, same kernel as a decode step's input, so the
logits are the same bits.

Decode steps (1..8 tokens, bf16, CPU): the head is half of the bytes a 4-bit model reads per token,
and torch's bf16 matmul reads it at about a third of the memory bandwidth (SmolLM2-135M's 49152 x 576
head: 6.9 ms vs 2.9 ms on one core of the dev VM). :class:`GemvHead` runs those calls through
``converter.kernels.gemv_bf16`` (float32 accumulation, within gamma_K of the exact dot product, as
torch's own matmul is); every other call (prefill, grad, other dtypes or devices, a bias) is
``F.linear`` as before. The layer stays an ``nn.Linear`` with the same (tied) weight: state dict,
PEFT and ``save_pretrained`` see no difference.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from converter.kernels.checks import GEMV_MAX_BATCH


def _standard_strides(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    x = args[0] if args else None
    if x is None or x.dim() < 3:
        return None
    return (x.reshape(-1, x.shape[-1]).contiguous().view(x.shape), *args[1:])


def _head(model: nn.Module) -> nn.Linear | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head if type(head) is nn.Linear else None


def flatten_head_input(model: nn.Module) -> RemovableHandle | None:
    """Give the model's output embedding, when it is a plain ``nn.Linear``, inputs with standard strides."""
    head = _head(model)
    return None if head is None else head.register_forward_pre_hook(_standard_strides)


class GemvHead(nn.Linear):
    """``nn.Linear`` whose bf16 CPU calls on 1..8 tokens (no bias, no grad) run our bf16 GEMV kernel."""

    #: Switch the kernel off (``F.linear`` for every call), e.g. to compare the two paths.
    use_gemv: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (
            self.use_gemv
            and self.bias is None
            and x.dtype == torch.bfloat16
            and w.dtype == torch.bfloat16
            and x.device.type == "cpu"
            and w.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        ):
            tokens = x.numel() // self.in_features
            if 1 <= tokens <= GEMV_MAX_BATCH:
                from converter.kernels import gemv_bf16 as k  # the extension; present when this class is used

                fn = k.gemv_bf16_op if torch.compiler.is_compiling() else k.gemv_bf16
                return fn(x.reshape(tokens, self.in_features), w).view(*x.shape[:-1], self.out_features)
        return F.linear(x, w, self.bias)


def use_gemv_head(model: nn.Module) -> bool:
    """Make the model's plain ``nn.Linear`` output embedding a :class:`GemvHead` (in place: the same
    module object, weight and hooks) when the C++ extension is built. Returns whether it did."""
    from converter.loader.ops import kernel_backend

    head = _head(model)
    if head is None or kernel_backend(torch.device("cpu")) is None:
        return False
    head.__class__ = GemvHead
    return True
