"""The plain lm_head of a loaded model (converter.loader.head): its prompt-step input gets standard strides
(same logits), and its bf16 CPU decode calls run our bf16 GEMV (logits within the derived bound of
torch's F.linear, compiled without a graph break)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from error_bounds import dot_bound
from loader_helpers import assert_compiled_without_breaks
from torch import nn

from converter.kernels import gemv_bf16 as gemv_bf16_module
from converter.loader.head import GemvHead, flatten_head_input, use_gemv_head
from converter.loader.model import load_quantized

IDS = torch.tensor([[1, 5, 9, 33, 2, 200, 7, 64], [3, 8, 13, 21, 34, 55, 89, 144]])


def _standard(x: torch.Tensor) -> bool:
    return x.stride() == torch.empty(x.shape).stride()


@pytest.mark.parametrize("batch", [1, 2])
def test_prompt_step_head_input_is_re_strided_and_logits_unchanged(our_folder: Path, batch: int) -> None:
    model = load_quantized(our_folder, dtype=torch.bfloat16)
    head = model.get_output_embeddings()
    assert type(head) is GemvHead
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


def _decode_step_head(model: nn.Module, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(head input, logits) of one decode step after a prompt, as generate() calls them (the prompt keeps
    the last position's logits only): 1 token per sequence at each step, the GEMV path."""
    seen: list[torch.Tensor] = []
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        out = model(IDS[:batch], use_cache=True, logits_to_keep=1)
        step = model(out.logits.argmax(-1), cache=out.past_key_values).logits
    handle.remove()
    return seen[-1], step


@pytest.mark.parametrize("batch", [1, 2])
def test_decode_step_head_runs_our_gemv_within_twice_the_bound_of_f_linear(
    our_folder: Path, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Everything before the head is the same code, so the hidden states are the same bits; the head's
    two paths each lie within dot_bound (float32 accumulation of K terms + the bf16 rounding) of the
    exact product, so they differ by at most twice that."""
    model = load_quantized(our_folder, dtype=torch.bfloat16)
    head = model.get_output_embeddings()
    assert isinstance(head, GemvHead)
    calls: list[tuple[int, ...]] = []
    real = gemv_bf16_module.gemv_bf16
    monkeypatch.setattr(
        gemv_bf16_module, "gemv_bf16", lambda x, w: calls.append(tuple(x.shape)) or real(x, w)
    )
    x, ours = _decode_step_head(model, batch)
    assert calls == [(batch, head.in_features)] * 2  # the prompt's last position, then the decode step
    head.use_gemv = False
    x_plain, theirs = _decode_step_head(model, batch)
    assert torch.equal(x, x_plain)
    _, bound = dot_bound(x.reshape(-1, x.shape[-1]), head.weight, out_dtype=torch.bfloat16)
    diff = (ours.double() - theirs.double()).reshape(bound.shape).abs()
    assert float((diff / (2 * bound)).max()) <= 1.0
    assert len(calls) == 2  # use_gemv = False: F.linear only


def test_head_gemv_leaves_other_calls_to_f_linear(our_folder: Path) -> None:
    model = load_quantized(our_folder, dtype=torch.bfloat16)
    head = model.get_output_embeddings()
    x = torch.randn(9, head.in_features).to(torch.bfloat16)  # 9 tokens: more than the GEMV takes
    with torch.no_grad():
        assert torch.equal(head(x), torch.nn.functional.linear(x, head.weight))
    one = x[:1].clone().requires_grad_()  # training: F.linear, so autograd reaches the input
    y = head(one)
    assert torch.equal(y, torch.nn.functional.linear(one, head.weight))
    y.sum().backward()
    assert one.grad is not None
    assert head.state_dict().keys() == {"weight"}


def test_head_gemv_compiles_fullgraph_and_gives_eager_bits(dynamo) -> None:
    head = nn.Linear(64, 300, bias=False).to(torch.bfloat16)
    holder = nn.Module()
    holder.get_output_embeddings = lambda: head
    assert use_gemv_head(holder)
    assert type(head) is GemvHead
    x = torch.randn(1, 1, 64).to(torch.bfloat16)
    with torch.no_grad():
        eager = head(x)
        compiled = torch.compile(head, fullgraph=True)(x)
    assert_compiled_without_breaks(dynamo)
    assert torch.equal(compiled, eager)


def _decode_logits(model: nn.Module, vocab: int) -> torch.Tensor:
    """One decode step's logits after the prompt (1 token per sequence: the GEMV path), the next token
    picked in the first ``vocab`` entries (the ids the embedding has)."""
    with torch.no_grad():
        out = model(IDS, use_cache=True, logits_to_keep=1)
        return model(out.logits[..., :vocab].argmax(-1), cache=out.past_key_values).logits


def _fast(head: nn.Module) -> bool:
    from converter.loader.head import _standard_strides

    return type(head) is GemvHead and any(h is _standard_strides for h in head._forward_pre_hooks.values())


@pytest.mark.parametrize("how", ["resize", "set_output_embeddings"])
def test_a_replaced_head_keeps_the_hook_and_the_gemv(our_folder: Path, how: str) -> None:
    """``resize_token_embeddings`` of the (untied) head builds a new plain ``nn.Linear`` and hands it to
    ``set_output_embeddings``: it lost the loader's GEMV and the prompt step's re-striding hook."""
    import copy
    import pickle

    model = load_quantized(our_folder, dtype=torch.bfloat16)
    old = model.get_output_embeddings()
    vocab = old.out_features
    with torch.no_grad():
        before = model(IDS, logits_to_keep=1).logits
        step_before = _decode_logits(model, vocab)
    if how == "resize":
        model.resize_token_embeddings(vocab + 16)
    else:
        new = nn.Linear(old.in_features, vocab + 16, bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            new.weight[:vocab] = old.weight
        model.set_output_embeddings(new)
    head = model.get_output_embeddings()
    assert head is not old
    assert head.out_features == vocab + 16
    assert _fast(head)
    assert len(head._forward_pre_hooks) == 1
    with torch.no_grad():
        after = model(IDS, logits_to_keep=1).logits
        step_after = _decode_logits(model, vocab)
    # the old vocabulary's rows are the old weights: same kernels, same bits
    assert torch.equal(after[..., :vocab], before)
    assert torch.equal(step_after[..., :vocab], step_before)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert _fast(twin.get_output_embeddings())
        replaced = nn.Linear(old.in_features, vocab, bias=False, dtype=torch.bfloat16)
        twin.set_output_embeddings(replaced)  # the twin's own wrapper, on the twin
        assert twin.get_output_embeddings() is replaced
        assert _fast(replaced)
        assert model.get_output_embeddings() is head


def test_dequantized_model_keeps_a_plain_head_when_replaced(our_folder: Path) -> None:
    model = load_quantized(our_folder, dtype=torch.bfloat16)
    model.dequantize()
    assert type(model.get_output_embeddings()) is nn.Linear
    model.resize_token_embeddings(model.get_output_embeddings().out_features + 16)
    assert type(model.get_output_embeddings()) is nn.Linear
