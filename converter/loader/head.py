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

A head that replaces it (``model.resize_token_embeddings(n)`` of an untied head builds a new plain
``nn.Linear`` and hands it to ``set_output_embeddings``, as a user may) gets both again: the loader
gives the model its own ``set_output_embeddings`` (:func:`set_output_embeddings`, a
``functools.partial`` in the instance's ``__dict__``: it survives ``deepcopy`` and pickling, and
torch.compile never traces it), which runs the class's and then :func:`keep_fast_head`. Before, CPU
decode fell back to torch's bf16 matmul and the prompt step to the strided path.
"""

from __future__ import annotations

import functools
import types
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
    """Give the model's output embedding, when it is a plain ``nn.Linear``, inputs with standard strides
    (once: None when it has the hook already)."""
    head = _head(model)
    if head is None or any(h is _standard_strides for h in head._forward_pre_hooks.values()):
        return None
    return head.register_forward_pre_hook(_standard_strides)


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
    hooked = head.__dict__.get("_old_forward")  # accelerate's hook: it calls the forward bound before
    if getattr(hooked, "__func__", None) is nn.Linear.forward:  # (a resized disk head: transformers
        head._old_forward = types.MethodType(GemvHead.forward, head)  # moved the hook onto it first)
    return True


#: The loaded model's attribute that says its head is kept fast (cleared by ``model.dequantize()``).
FAST_HEAD = "_qm_fast_head"


def install_fast_head(model: nn.Module) -> None:
    """The loader's head: :func:`flatten_head_input` and :func:`use_gemv_head` now, and again for a head
    that replaces it through ``set_output_embeddings`` (``resize_token_embeddings`` of an untied head)."""
    flatten_head_input(model)
    use_gemv_head(model)
    if hasattr(type(model), "set_output_embeddings"):
        model.__dict__[FAST_HEAD] = True
        model.__dict__["set_output_embeddings"] = functools.partial(set_output_embeddings, model)


def keep_fast_head(model: nn.Module) -> None:
    """After the model's output embedding was replaced: the new plain ``nn.Linear`` gets the hook and the
    GEMV, as :func:`install_fast_head` gave the loaded one (nothing for a model without it)."""
    if model.__dict__.get(FAST_HEAD):
        flatten_head_input(model)
        use_gemv_head(model)


def drop_fast_head(model: nn.Module) -> None:
    """Undo :func:`install_fast_head`'s wrapper (``model.dequantize()``: a plain model keeps a plain head)."""
    model.__dict__.pop(FAST_HEAD, None)
    wrapper = model.__dict__.get("set_output_embeddings")
    if isinstance(wrapper, functools.partial) and wrapper.func is set_output_embeddings:
        del model.__dict__["set_output_embeddings"]


def set_output_embeddings(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A loaded model's ``set_output_embeddings``: the class's, then :func:`keep_fast_head`."""
    out = type(self).set_output_embeddings(self, *args, **kwargs)
    keep_fast_head(self)
    return out
