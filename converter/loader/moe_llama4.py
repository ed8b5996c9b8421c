"""Llama 4's routed experts in 4 bit, run only for the experts the router picked.

transformers builds a pre-quantized Llama 4's experts as ``SequentialLlama4TextExperts`` (per-expert
``nn.Linear``, converter/sources/llama4.py), and ``Llama4TextMoe`` calls them as it calls its fused
``Llama4TextExperts``: ``experts(routed_in)`` with ``routed_in [E*T, H]``, whose block ``e`` is every
token's hidden state times its router score for expert ``e``, ``sigmoid(-inf) = 0`` for the experts the
token was not routed to. Both run every expert on every token (the zero rows included), so a Scout
(16 experts, top-1) reads all 16 experts' weights per token where the router needs one.

:class:`QuantLlama4Experts4bit` takes the same call. Its per-expert records are stacked as any 4-bit
experts layer's (:class:`converter.loader.moe.QuantExperts4bit`: one buffer per layer, the grouped GEMV
on decode, grouped dequantize + matmul on prefill, compile and CUDA graphs), and it runs each token's
``k`` routed blocks only: the routed experts of a token are its blocks that are not zero (the router
scatters its top-k scores into ``-inf``), found with one top-k over the blocks' largest ``|x|`` on the
device (no host sync). The other rows of the output are zeros, as an expert's SwiGLU without biases
gives for a zero row, so ``Llama4TextMoe``'s sum over the blocks adds exactly what it did.

16-bit experts (``--moe-experts keep`` folders) stay transformers' ``SequentialLlama4TextExperts`` (its
per-expert ``nn.Linear``, which LoRA can wrap, and its state-dict names) with :func:`route_sequential`'s
forward: each hit expert's MLP on its routed rows only, the other rows zeros as above. Finding the hit
experts syncs with the host, so under ``torch.compile`` and CUDA-graph capture the module's own dense
forward runs.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from converter.loader.moe import QuantExperts4bit

__all__ = ["QuantLlama4Experts4bit", "is_llama4_sequential", "route_block", "route_sequential"]


def is_llama4_sequential(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' per-expert Llama 4 experts (``SequentialLlama4TextExperts``)."""
    return type(module).__name__ == "SequentialLlama4TextExperts"


def _routes(routed_in: torch.Tensor, num: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(blocks [E, T, H], each token's routed experts [T, k], the token of each entry [T, k]): a token's
    routed experts are its k blocks that are not zero (a block scaled by a score that underflowed to 0
    may lose to a zero one: both add nothing)."""
    blocks = routed_in.view(num, -1, routed_in.shape[-1])
    top_k_index = blocks.abs().amax(dim=-1).T.topk(top_k, dim=1).indices
    token = torch.arange(blocks.shape[1], device=routed_in.device).unsqueeze(1).expand_as(top_k_index)
    return blocks, top_k_index, token


def route_sequential(module: nn.ModuleList, top_k: int) -> None:
    """Make a 16-bit ``SequentialLlama4TextExperts`` run each token's routed experts only (module
    docstring): its forward replaced on the instance, so its class, children and names stay."""
    module.top_k = top_k
    module.forward = _bound(_sequential_routed_forward, module)


def _bound(function: Any, module: nn.Module) -> partial:
    """``function`` bound to ``module`` as its instance ``forward``: a ``functools.partial``, which pickles
    the function by its name in this module. A ``MethodType`` pickles as ``getattr(module, name)``, which
    the module's class (transformers') does not have: ``torch.load`` of a saved model failed with
    "'Llama4TextMoe' object has no attribute '_routed_block_forward'"."""
    return partial(function, module)


def _sequential_routed_forward(self: nn.ModuleList, hidden_states: torch.Tensor) -> torch.Tensor:
    num = self.num_experts
    if torch.compiler.is_compiling() or self.top_k >= num or _capturing(hidden_states):
        return type(self).forward(self, hidden_states)  # transformers' dense loop
    blocks, top_k_index, token = _routes(hidden_states, num, self.top_k)
    hit = torch.zeros(blocks.shape[:2], dtype=torch.bool, device=blocks.device)
    hit[top_k_index, token] = True
    out = torch.zeros_like(blocks)
    for e in hit.any(dim=1).nonzero().flatten().tolist():  # ascending, as transformers' loop
        rows = hit[e].nonzero().flatten()
        out[e, rows] = self[e](blocks[e, rows])
    return out


def route_block(block: nn.Module) -> None:
    """Give a ``Llama4TextMoe`` whose experts are :class:`QuantLlama4Experts4bit` a forward that hands
    its experts each token's routed rows (``hidden * score``, the router's own top-k) instead of the
    ``E``-fold ``routed_in`` they would take apart again: the same products and sums, about ten fewer
    kernels a layer (the repeat, the ``E``-fold scaling, the top-k over blocks, the zero-filled output
    and the sum over ``E``). Replaced on the instance: the class, its children and names stay."""
    block.forward = _bound(_routed_block_forward, block)


def _routed_block_forward(self: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    experts, k = self.experts, self.top_k
    if not isinstance(experts, QuantLlama4Experts4bit) or k > 2:
        # model.dequantize() put transformers' experts back; more than two slots would sum in another
        # order than transformers' sum over every expert's block
        return type(self).forward(self, hidden_states)
    h = hidden_states.reshape(-1, self.hidden_dim)
    top_k_index, scores, router_logits = _route(self.router, h, k)
    rows = (h.unsqueeze(1) * scores.unsqueeze(-1)).reshape(-1, h.shape[-1])  # routed_in's rows, same product
    ones = torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)
    y = experts(rows, top_k_index.reshape(-1, 1), ones)  # each (token, slot) its own row, weight 1
    out = self.shared_expert(h)
    # transformers sums every expert's block (zero but the routed ones): one value, or two in float32
    out.add_(y if k == 1 else y.view(-1, k, y.shape[-1]).sum(dim=1))
    return out, router_logits


def _route(router: nn.Module, h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The routed experts of each token, their scores and the router logits. transformers'
    ``Llama4Router`` scatters its top-k values into ``-inf`` and takes the sigmoid of all ``E``; the
    scores of the routed experts are the sigmoid of those values (an elementwise op: the same bits),
    so the scatter, the ``E``-wide sigmoid and a second top-k are left out. A router of another class
    (or one with hooks: LoRA, offload) is called as transformers calls it."""
    if type(router) is not _router_class() or router._forward_hooks or router._forward_pre_hooks:
        router_scores, router_logits = router(h)
        top_k_index = torch.topk(router_logits, k, dim=1).indices  # the router's own top-k, again
        return top_k_index, router_scores.gather(1, top_k_index), router_logits
    router_logits = nn.Linear.forward(router, h)
    values, top_k_index = torch.topk(router_logits, k, dim=1)
    return top_k_index, torch.sigmoid(values.float()).to(values.dtype), router_logits


def _router_class() -> type:
    from transformers.models.llama4.modeling_llama4 import Llama4Router

    return Llama4Router


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


class QuantLlama4Experts4bit(QuantExperts4bit):
    """A Llama 4 layer's routed experts in 4 bit, called as ``Llama4TextExperts`` is (module docstring)."""

    def __init__(self, *args: Any, top_k: int, config: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.top_k = top_k
        self.config = config  # Llama4TextExperts(config) again for model.dequantize()

    def forward(  # type: ignore[override]
        self,
        routed_in: torch.Tensor,
        top_k_index: torch.Tensor | None = None,
        top_k_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``experts(routed_in)`` as ``Llama4TextMoe`` calls ``Llama4TextExperts``: [E*T, H] -> [E*T, H];
        or, from :func:`route_block`'s forward, ``experts(rows, top_k_index, top_k_weights)`` as any
        4-bit experts layer: the routed rows only, [T*k, H] -> [T*k, H]."""
        if top_k_index is not None:
            return super().forward(routed_in, top_k_index, top_k_weights)
        num, hidden = self.num_experts, self.hidden_dim
        blocks, top_k_index, token = _routes(routed_in, num, self.top_k)
        tokens = blocks.shape[1]
        rows = blocks[top_k_index, token].reshape(-1, hidden)  # (token, slot) pairs, scaled as routed
        ones = torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)
        y = super().forward(rows, top_k_index.reshape(-1, 1), ones)  # each pair its own row, weight 1
        out = routed_in.new_zeros(num, tokens, hidden)
        out[top_k_index, token] = y.view(tokens, self.top_k, hidden)
        return out.view(num * tokens, hidden)

    def dense_module(self, dtype: torch.dtype) -> nn.Module:
        """transformers' fused ``Llama4TextExperts`` with these weights (``x @ W`` orientation:
        ``gate_up_proj[e] = cat([gate, up]).T``, ``down_proj[e] = down.T``), for ``model.dequantize()``."""
        from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

        with torch.device("meta"):
            fused = Llama4TextExperts(self.config)
        pairs = [self.expert_weights(e, dtype) for e in range(self.num_experts)]
        gate_up = torch.stack([gu.T for gu, _ in pairs])
        down = torch.stack([dn.T for _, dn in pairs])
        fused.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
        fused.down_proj = nn.Parameter(down, requires_grad=False)
        return fused
