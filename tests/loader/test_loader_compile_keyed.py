"""A compiled step reads a 4-bit layer's small kernel tensors by key (converter/kernels/prepared.py):
the graph's only input from a layer is its weight, so plain ``torch.compile`` guards no more
tensors per layer than a bf16 model's, and the keys stay right through copies, pickling, re-prepared
weights and freed layers."""

from __future__ import annotations

import copy
import gc
import io
import warnings
from pathlib import Path

import pytest
import torch
from dynamo_helpers import export_outlives_model, guard_names_or_skip, trace_guards
from loader_helpers import assert_compiled_without_breaks

from converter.kernels import prepared
from converter.loader import ops
from converter.loader.model import load_quantized

IDS = torch.tensor([[1, 5, 9, 33, 2, 200, 7, 64]])  # 8 tokens: the fused GEMV path


def _load(folder: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_quantized(folder).eval()


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if getattr(m, "_kernel_args", None) is not None]


def test_keyed_launches_while_compiling_and_not_while_exporting(dynamo) -> None:
    """Traced launches read by key under torch.compile and take tensors under torch.export. torch 2.11's
    dynamo folds ``torch.compiler.is_exporting()`` to True under torch.compile as well: asking it sent
    every compiled call down the general path there (found on the GPU machine's torch)."""
    seen: list[bool] = []

    class Probe(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(ops.keyed_tracing())
            return x + 1

    torch.compile(Probe(), fullgraph=True, backend="eager")(torch.ones(2))
    assert seen == [True]
    torch.export.export(Probe(), (torch.ones(2),))
    assert seen[1:]
    assert not any(seen[1:])
    assert not ops.keyed_tracing()


def test_graph_reads_only_the_codes_of_each_layer(dynamo, our_folder: Path) -> None:
    model = _load(our_folder)
    names, ops, _ = trace_guards(model, IDS)
    assert_compiled_without_breaks(dynamo)
    assert any("gemv_4bit_keyed" in op or "gemv_4bit_multi_keyed" in op for op in ops)
    assert not any(op.endswith(("gemv_4bit.default", "gemv_4bit_multi.default")) for op in ops)
    names = guard_names_or_skip(names)
    assert not [n for n in names if "._kernel_args." in n]  # the prepared tensors are no graph inputs
    weights = [n for n in names if n.endswith("._buffers['weight']")]
    assert len(weights) == len(_layers(model))  # one tensor per 4-bit layer: its weight, as bf16's


def test_compiled_logits_equal_eager(dynamo, our_folder: Path) -> None:
    model = _load(our_folder)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(IDS).logits, model(IDS).logits)


def test_copies_and_unpickled_models_read_their_own_tensors(dynamo, our_folder: Path) -> None:
    """A deep copy (and an unpickled model) registers its own copies under new keys: the compiled copy
    still runs after the original is freed, and gives the original's logits."""
    model = _load(our_folder)
    with torch.no_grad():
        expected = model(IDS).logits
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    keys = {m._kernel_args.key for m in _layers(model)}
    for other in (twin, loaded):
        other_keys = {m._kernel_args.key for m in _layers(other)}
        assert len(other_keys) == len(keys)
        assert not other_keys & keys
        for m in _layers(other):
            assert prepared.lookup(m._kernel_args.key) is m._kernel_args
    del model
    gc.collect()
    assert not any(k in prepared._ARGS for k in keys)  # the original's entries went with it
    for other in (twin, loaded):
        compiled = torch.compile(other, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            assert torch.equal(compiled(IDS).logits, expected)
        torch._dynamo.reset()


def test_a_reprepared_layer_recompiles(dynamo, our_folder: Path) -> None:
    """A layer given another weight prepares again under a new key: the compiled model (no guard
    filter) gives the new eager logits instead of reading a released key."""
    model = _load(our_folder)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    layers = model.model.layers
    with torch.no_grad():
        compiled(IDS)
        old = layers[0].self_attn.q_proj._kernel_args.key
        layers[0].self_attn.q_proj.load_state_dict(layers[1].self_attn.q_proj.state_dict())
        assert layers[0].self_attn.q_proj._kernel_args.key != old
        with pytest.raises(RuntimeError, match=f"no prepared 4-bit weight under key {old}"):
            prepared.lookup(old)
        assert torch.equal(compiled(IDS).logits, model(IDS).logits)


def test_a_weight_put_in_place_of_the_prepared_one_recompiles(dynamo, our_folder: Path) -> None:
    """A compiled graph reads the layer's key and weight, not ``_prepared_for``: a weight object put in
    the prepared one's place (same shape, other codes), with no eager call in between, fails the graph's
    identity guard on the weight, and the call is traced again on the general path (which breaks the
    graph where it prepares the weight) and gives the eager logits."""
    model = _load(our_folder)
    compiled = torch.compile(model, backend="aot_eager")
    q0, q1 = model.model.layers[0].self_attn.q_proj, model.model.layers[1].self_attn.q_proj
    with torch.no_grad():
        before = compiled(IDS).logits
        q0._buffers["weight"] = q1.weight  # the key stays, the weight object is another one
        assert q0._kernel_args is not None
        assert q0._prepared_for is not q0.weight
        got = compiled(IDS).logits
        want = model(IDS).logits
        assert not torch.equal(want, before)
        assert torch.equal(got, want)


@pytest.mark.parametrize("fused", [False, True], ids=["single", "siblings"])
def test_exported_program_holds_the_tensors_not_keys(dynamo, our_folder: Path, monkeypatch, fused) -> None:
    """torch.export (strict: dynamo) of a loaded model: the program takes the prepared tensors as it did
    before the keyed ops (keys are this process's: a saved program would read no or other layers'
    tensors), runs after its model is freed and gives the eager logits."""
    from converter.loader import siblings

    if fused:
        monkeypatch.setattr(siblings, "FUSED_DEVICE_TYPES", {"cpu", "cuda"})

    ops = export_outlives_model(lambda: _load(our_folder), IDS)
    assert any(
        op.startswith("quantize_model.gemv_4bit_multi" if fused else "quantize_model.gemv_4bit") for op in ops
    )


def test_preparing_again_keeps_one_finalizer_per_layer(our_folder: Path) -> None:
    """A layer prepared again and again (weights reloaded, adapters merged and unmerged) holds one
    finalizer for its current key, not one per preparation while it lives."""
    import weakref

    model = _load(our_folder)
    layer = model.model.layers[0].self_attn.q_proj
    state = layer.state_dict()
    gc.collect()
    before = len(weakref.finalize._registry)  # CPython's table of live finalizers
    for _ in range(20):
        layer.load_state_dict(state)
    gc.collect()
    assert len(weakref.finalize._registry) == before
    keys = {m._kernel_args.key for m in _layers(model)}
    del model, layer
    gc.collect()
    assert not any(k in prepared._ARGS or k in prepared._FINALIZERS for k in keys)


def test_codes_replaced_in_place_are_read_as_eager_reads_them(dynamo, our_folder: Path) -> None:
    """``weight.data = ...`` swaps the codes under a prepared layer: the eager call prepares the new codes
    with the weight's quant state (test_loader_module.py); the compiled graph's keyed op reads the codes
    it is given, with the registered absmax (the same quant state), so both give the new logits. (Round
    35 saw the old logits here on torch 2.11: the graph had not taken the keyed path at all, see
    test_keyed_launches_while_compiling_and_not_while_exporting; round 34's op refused other memory,
    which broke torch's ``cudagraphs`` backend: it copies the weights before it records.)"""
    model = _load(our_folder)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    layers = model.model.layers
    with torch.no_grad():
        before = compiled(IDS).logits
        layers[0].mlp.down_proj.weight.data = layers[1].mlp.down_proj.weight.data.clone()
        got = compiled(IDS).logits
        assert not torch.equal(got, before)
        assert torch.equal(got, model(IDS).logits)


def test_keyed_op_reads_a_copy_of_the_codes_and_refuses_other_sizes(our_folder: Path) -> None:
    """What torch's ``cudagraphs`` backend does at record time: the weight is a copy of the registered
    codes at another address. The op reads the copy (the same bytes: the same output); codes of another
    size get an error naming the key and load_state_dict."""
    layer = _layers(_load(our_folder))[0]
    key, weight = layer._prepared_key, layer.weight
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    op = torch.ops.quantize_model.gemv_4bit_keyed
    with torch.no_grad():
        expected = op(x, weight, key, layer.out_features)
        assert torch.equal(op(x, weight.detach().clone(), key, layer.out_features), expected)
        assert torch.equal(expected, layer(x))
        with pytest.raises(ValueError, match=rf"key {key} was registered for a weight of .*load_state_dict"):
            op(x, weight.detach().reshape(-1)[:-1].clone(), key, layer.out_features)


def test_epoch_changes_when_a_live_layer_drops_its_kernel_tensors(
    our_folder: Path, int8_folder: Path
) -> None:
    """``prepared.epoch()`` (graphed_greedy records its CUDA graphs again when it changed) changes when a
    layer drops tensors a recorded graph may launch with: 4-bit layers prepared again or given a weight in
    place of their own, int8 layers given new codes, MoE experts moved to new buffers; and not when
    layers are only called, copied or collected (graphs of other models would be recorded for nothing)."""
    import torch.nn.functional as F

    from converter.loader.moe import QuantExperts4bit

    model = _load(our_folder)
    layer = model.model.layers[0].self_attn.q_proj

    def changes(action) -> bool:
        before = prepared.epoch()
        action()
        return prepared.epoch() != before

    with torch.no_grad():
        assert not changes(lambda: model(IDS))
        assert not changes(lambda: copy.deepcopy(model))
        assert not changes(gc.collect)
        assert changes(lambda: layer.load_state_dict(layer.state_dict()))
        x = torch.randn(1, 64, dtype=torch.bfloat16)
        layer.weight.data = layer.weight.data.clone()  # codes replaced in place: the next call prepares
        assert changes(lambda: layer(x))
        assert not changes(lambda: layer(x))
        # a weight assigned in its place (PEFT's bnb merge): the first call drops the prepared tensors
        # (and unmerge: another one), whose tensors graphs recorded on the general path read
        for _ in range(2):
            layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
            layer.weight.quant_state = layer.quant_state
            assert changes(lambda: layer(x))
            assert not changes(lambda: layer(x))
    int8 = next(m for m in _load(int8_folder).modules() if type(m).__name__.endswith("Linear8bit"))
    assert changes(lambda: int8.load_state_dict(int8.state_dict()))
    hidden, inter, experts = 64, 64, 2
    codes, blocks = torch.zeros(experts, 3 * hidden * inter // 2, dtype=torch.uint8), 3 * hidden * inter // 64
    moe = QuantExperts4bit(
        codes, torch.ones(experts, blocks), torch.linspace(-1, 1, 16), hidden_dim=hidden,
        intermediate=inter, blocksize=64, quant_type="nf4",
        dtype=torch.bfloat16, compute_dtype=None, act_name="silu", act_fn=F.silu,
    )  # fmt: skip
    assert not changes(lambda: moe.to("cpu").half())  # the same buffers (codes and scales are not cast)
    assert changes(lambda: moe._apply(torch.clone))  # what a device move does: new buffers
