"""q/k/v and gate/up share one GEMV launch per decode step (converter/loader/siblings.py).

What users rely on: the grouped model gives the same logits as each layer launching alone (on the
CPU the fused launch computes every row exactly as the single launch does: the same bits), one
launch per group per step, and correct outputs whatever order or inputs a model feeds its layers.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from loader_helpers import assert_compiled_without_breaks

from converter.loader import ops, siblings
from converter.loader.model import load_quantized
from converter.loader.siblings import group_siblings, ungroup_siblings

IDS = torch.tensor([[1, 5, 9, 33, 2, 200, 7, 64]])


def _load(folder: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_quantized(folder)


@pytest.fixture(autouse=True)
def fuse_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The groups launch together on CUDA only by default; the logic is the same on the CPU, tested here."""
    monkeypatch.setattr(siblings, "FUSED_DEVICE_TYPES", {"cpu", "cuda"})


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts fused launches (weights per launch) while the test runs."""
    seen: list[int] = []
    real = ops.gemv_prepared_multi

    def counting(x2d, args_seq, weights=None):
        seen.append(len(args_seq))
        return real(x2d, args_seq, weights)

    monkeypatch.setattr(ops, "gemv_prepared_multi", counting)
    return seen


def _attention(model: torch.nn.Module):
    return model.model.layers[0].self_attn


def test_loader_groups_qkv_and_gate_up(our_folder: Path) -> None:
    model = _load(our_folder)
    layers = model.model.layers
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.q_proj._siblings is attn.k_proj._siblings is attn.v_proj._siblings is not None
        assert mlp.gate_proj._siblings is mlp.up_proj._siblings is not None
        assert mlp.down_proj._siblings is None
        assert attn.o_proj._siblings is None
    assert group_siblings(model) == 0  # grouping twice forms nothing new


@pytest.mark.parametrize("tokens", [1, 3], ids=["batch-1", "batch-3"])
def test_decode_step_launches_once_per_group_with_the_ungrouped_logits(
    our_folder: Path, launches: list[int], tokens: int
) -> None:
    grouped = _load(our_folder)
    alone = _load(our_folder)
    ungroup_siblings(alone)
    ids = IDS[:, :tokens]
    with torch.no_grad():
        want = alone(ids).logits
        assert launches == []
        got = grouped(ids).logits
    n_layers = len(grouped.model.layers)
    assert sorted(launches) == [2] * n_layers + [3] * n_layers  # one per attention, one per MLP
    assert torch.equal(got, want)  # CPU: each row computed as the single launch computes it


def test_prefill_takes_each_layers_own_path(our_folder: Path, launches: list[int]) -> None:
    model = _load(our_folder)
    with torch.no_grad():
        _ = model(IDS.repeat(1, 2)).logits  # 16 tokens: dequantize + matmul, no GEMV
    assert launches == []


def test_any_call_order_gives_each_layer_its_own_output(our_folder: Path, launches: list[int]) -> None:
    model = _load(our_folder)
    attn = _attention(model)
    x = torch.randn(1, 1, attn.q_proj.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        want = [m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
        launches.clear()
        ungroup_siblings(model)
        alone = [m(x) for m in (attn.v_proj, attn.q_proj, attn.k_proj)]
        group_siblings(model)
        got = {name: getattr(attn, name)(x) for name in ("v_proj", "q_proj", "k_proj")}
    assert launches == [3]
    assert torch.equal(got["q_proj"], want[0])
    assert torch.equal(got["q_proj"], alone[1])
    assert torch.equal(got["k_proj"], want[1])
    assert torch.equal(got["v_proj"], want[2])


def test_different_inputs_or_an_input_changed_in_place_are_never_mixed_up(our_folder: Path) -> None:
    model = _load(our_folder)
    attn = _attention(model)
    k = attn.q_proj.in_features
    x, other = torch.randn(2, 1, 1, k, dtype=torch.bfloat16)
    with torch.no_grad():
        reference = {n: getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")}
        ungroup_siblings(model)
        want_x = {n: m(x) for n, m in reference.items()}
        want_other = {n: m(other) for n, m in reference.items()}
        group_siblings(model)
        assert torch.equal(attn.q_proj(x), want_x["q_proj"])
        assert torch.equal(attn.k_proj(other), want_other["k_proj"])  # parked outputs are for x
        x.mul_(2)  # same object, new values: the parked v output is stale
        assert torch.equal(attn.v_proj(x), ungroup_and_call(model, attn.v_proj, x))


def ungroup_and_call(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    group = layer._siblings
    layer._siblings = None
    try:
        return layer(x)
    finally:
        layer._siblings = group


def test_a_group_whose_outputs_go_unused_switches_itself_off(our_folder: Path, launches: list[int]) -> None:
    """A model feeding its projections different tensors: no launch of three weights for one output."""
    model = _load(our_folder)
    attn = _attention(model)
    with torch.no_grad():
        for _ in range(siblings.MAX_MISSES + 3):
            attn.q_proj(torch.randn(1, attn.q_proj.in_features, dtype=torch.bfloat16))
    assert len(launches) == siblings.MAX_MISSES
    assert attn.q_proj._siblings.enabled is False


def test_training_input_takes_the_autograd_path(our_folder: Path, launches: list[int]) -> None:
    model = _load(our_folder)
    attn = _attention(model)
    x = torch.randn(1, attn.q_proj.in_features, dtype=torch.bfloat16, requires_grad=True)
    (attn.q_proj(x).sum() + attn.k_proj(x).sum()).backward()
    assert launches == []
    assert x.grad is not None
    assert x.grad.isfinite().all()


@pytest.mark.parametrize("tokens", [1, 4], ids=["batch-1", "batch-4"])
def test_compiled_model_has_no_graph_break_and_the_eager_logits(
    dynamo, our_folder: Path, launches: list[int], tokens: int
) -> None:
    model = _load(our_folder)
    ids = IDS[:, :tokens]
    with torch.no_grad():
        eager = model(ids).logits
        launches.clear()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits
    assert_compiled_without_breaks(dynamo)
    assert sorted(launches) == sorted([2, 3] * len(model.model.layers))  # traced: one per group
    assert torch.equal(compiled, eager)
    assert all(m._siblings._parked is None for m in model.modules() if getattr(m, "_siblings", None))
    assert not siblings._TRACED_PARKED  # the traced launches' parked outputs, all taken


def test_cpu_layers_launch_alone_by_default(our_folder: Path, launches: list[int], monkeypatch) -> None:
    """On the CPU each layer's own lean launch is cheaper than the grouped op (siblings.py says why)."""
    monkeypatch.setattr(siblings, "FUSED_DEVICE_TYPES", {"cuda"})
    model = _load(our_folder)
    with torch.no_grad():
        _ = model(IDS[:, :1]).logits
    assert launches == []


def test_codes_replaced_in_place_leave_the_group_launch(our_folder: Path, launches: list[int]) -> None:
    """``q_proj.weight.data = codes``: the group's next launch would read the codes its members prepared;
    the swapped member runs its own call instead (prepared again from the new codes), and later group
    launches read the new codes. Every output equals a layer built from the new codes: the same
    kernel on the same bytes."""
    from converter.loader.module import Linear4bit

    model = _load(our_folder)
    attn = _attention(model)
    x = torch.randn(1, 1, attn.q_proj.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        old = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        codes = model.model.layers[1].self_attn.q_proj.weight.data.clone()
        attn.q_proj.weight.data = codes
        want = Linear4bit(codes, attn.q_proj.weight.quant_state)(x)
        assert not torch.equal(want, old[0])
        for _ in range(2):  # the call after the swap, then the group launch from the new codes
            got = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            assert torch.equal(got[0], want)
            assert torch.equal(got[1], old[1])
            assert torch.equal(got[2], old[2])
    assert len(launches) >= 2  # the group launches again after the swap
    assert set(launches) == {3}


def test_compiled_group_sees_a_weight_put_in_place_of_a_members(dynamo, our_folder: Path) -> None:
    """The traced group launch reads each member's key and weight identity (not its kernel arguments):
    v_proj given another weight object behind its back (no eager call in between) fails the graph's
    identity guard, and the retraced call leaves v_proj out of the group: the eager logits."""
    model = _load(our_folder)
    attn = _attention(model)
    compiled = torch.compile(model, backend="aot_eager")
    ids = IDS[:, :1]
    with torch.no_grad():
        before = compiled(ids).logits
        attn.v_proj._buffers["weight"] = model.model.layers[1].self_attn.v_proj.weight
        got = compiled(ids).logits
        want = model(ids).logits
    assert not torch.equal(want, before)
    assert torch.equal(got, want)
