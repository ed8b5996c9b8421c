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
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from converter.loader.moe import QuantExperts4bit

__all__ = ["QuantLlama4Experts4bit", "is_llama4_sequential"]


def is_llama4_sequential(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' per-expert Llama 4 experts (``SequentialLlama4TextExperts``)."""
    return type(module).__name__ == "SequentialLlama4TextExperts"


class QuantLlama4Experts4bit(QuantExperts4bit):
    """A Llama 4 layer's routed experts in 4 bit, called as ``Llama4TextExperts`` is (module docstring)."""

    def __init__(self, *args: Any, top_k: int, config: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.top_k = top_k
        self.config = config  # Llama4TextExperts(config) again for model.dequantize()

    def forward(self, routed_in: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        num, hidden = self.num_experts, self.hidden_dim
        blocks = routed_in.view(num, -1, hidden)
        tokens = blocks.shape[1]
        # each token's routed experts: its k blocks that are not zero (a block scaled by a score that
        # underflowed to 0 may lose to a zero one: both add nothing)
        top_k_index = blocks.abs().amax(dim=-1).T.topk(self.top_k, dim=1).indices  # [T, k]
        token = torch.arange(tokens, device=routed_in.device).unsqueeze(1).expand_as(top_k_index)
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
