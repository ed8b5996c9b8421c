"""The plain (not quantized) lm_head's input: handed over with standard strides.

At the prompt step transformers keeps the last position of the hidden states,
``hidden[:, -1:, :]`` ([B, 1, H] with the prompt's strides). ``F.linear`` on that 3-D view does not fold
it into one matrix product: it goes through ``bmm`` and copies the transposed [vocab, H] weight on every
call (SmolLM2-135M, 2-core VM: ~140 ms against ~13 ms for the same input with standard strides, most of
the time to first token). A forward pre-hook re-views the input as [N, H] and back, which gives
standard strides (a copy of the few KB of activations only when B > 1). Same values, same
kernel as a decode step's input, so the logits are the same bits.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle


def _standard_strides(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    x = args[0] if args else None
    if x is None or x.dim() < 3:
        return None
    return (x.reshape(-1, x.shape[-1]).contiguous().view(x.shape), *args[1:])


def flatten_head_input(model: nn.Module) -> RemovableHandle | None:
    """Give the model's output embedding, when it is a plain ``nn.Linear``, inputs with standard strides."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return None
    return head.register_forward_pre_hook(_standard_strides)
