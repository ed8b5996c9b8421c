"""The plain lm_head gets its prompt-step input with standard strides (converter.loader.head), same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from converter.loader.head import flatten_head_input
from converter.loader.model import load_quantized

IDS = torch.tensor([[1, 5, 9, 33, 2, 200, 7, 64], [3, 8, 13, 21, 34, 55, 89, 144]])


def _standard(x: torch.Tensor) -> bool:
    return x.stride() == torch.empty(x.shape).stride()


@pytest.mark.parametrize("batch", [1, 2])
def test_prompt_step_head_input_is_re_strided_and_logits_unchanged(our_folder: Path, batch: int) -> None:
    model = load_quantized(our_folder, dtype=torch.bfloat16)
    head = model.get_output_embeddings()
    assert type(head) is nn.Linear
    seen: list[torch.Tensor] = []
    head.register_forward_pre_hook(lambda m, args: seen.append(args[0]))  # runs after the loader's hook
    ids = IDS[:batch]
    with torch.no_grad():
        # logits_to_keep=1: transformers hands the head hidden[:, -1:, :], the prompt's strides.
        hooked = model(ids, logits_to_keep=1).logits
        assert seen[-1].shape == (batch, 1, head.in_features)
        assert _standard(seen[-1])
        head._forward_pre_hooks.popitem(last=False)  # the loader's hook, registered first
        plain = model(ids, logits_to_keep=1).logits
        assert not _standard(seen[-1]), "the test no longer sees the strided slice it guards against"
    assert torch.equal(hooked, plain)


def test_only_a_plain_linear_head_gets_the_hook() -> None:
    class NoHead(nn.Module):
        def get_output_embeddings(self) -> None:
            return None

    assert flatten_head_input(NoHead()) is None
    assert flatten_head_input(nn.Linear(2, 2)) is None  # no get_output_embeddings at all
