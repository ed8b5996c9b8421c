"""A compiled step reads a 4-bit experts layer's absmax and code table by key
(``quantize_model::moe_experts_4bit_keyed``, converter/kernels/prepared.py): the graph's only input from
the layer is its codes (``packed``), and the keys stay right through copies, pickling, loaded state
dicts, device moves, torch.export, training and freed layers."""

from __future__ import annotations

import copy
import gc
import io
import warnings
from pathlib import Path

import pytest
import torch
from dynamo_helpers import export_outlives_model, guard_names_or_skip, trace_guards
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from converter.kernels import prepared
from converter.loader.model import load_quantized
from converter.loader.moe import QuantExperts4bit, moe_experts_4bit_keyed, moe_modules

IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64]])  # 8 tokens: the grouped GEMV (decode) path
LONG = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64, 11, 90, 3, 45]])  # 12 tokens: sorted by expert


def _load(folder: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_quantized(folder).eval()


def _experts(model: torch.nn.Module) -> list[QuantExperts4bit]:
    return list(moe_modules(model).values())


def _keys(model: torch.nn.Module) -> set[int]:
    return {m._prepared.key for m in _experts(model)}


def test_graph_reads_only_the_codes_of_each_experts_layer(dynamo, folders) -> None:
    """One tensor guard and one graph input per experts layer (its codes), two fewer than the plain op
    (absmax, quant_map): the tensors the layer registered are not read by the traced code."""
    q, _ = folders("qwen3_moe")
    model = _load(q)
    layers = _experts(model)
    names, ops, inputs = trace_guards(model, IDS)
    assert dict(dynamo["graph_break"]) == {}
    assert sum(op.startswith("quantize_model.moe_experts_4bit_keyed") for op in ops) == len(layers)
    assert not any(op.startswith("quantize_model.moe_experts_4bit.") for op in ops)

    torch._dynamo.reset()
    for m in layers:  # unregistered: the plain op, which takes the tensors
        prepared.release(m._prepared.key)
        m.__dict__["_prepared"], m.__dict__["_prepared_key"] = None, -1
    plain_names, plain_ops, plain_inputs = trace_guards(model, IDS)
    assert any(op.startswith("quantize_model.moe_experts_4bit.") for op in plain_ops)
    assert plain_inputs - inputs == 2 * len(layers)

    names, plain_names = guard_names_or_skip(names), guard_names_or_skip(plain_names)
    experts_guards = [n for n in names if "experts" in n]
    assert len(experts_guards) == len(layers)
    assert all(n.endswith("._buffers['packed']") for n in experts_guards)
    assert not [n for n in names if "_prepared" in n]
    assert len(plain_names) - len(names) == 2 * len(layers)


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "qwen3_moe_i32"])
@pytest.mark.parametrize("ids", [IDS, LONG], ids=["decode", "prefill"])
def test_compiled_logits_equal_eager(dynamo, folders, name, ids) -> None:
    model = _load(folders(name)[0])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(ids).logits, model(ids).logits)
    assert dict(dynamo["graph_break"]) == {}


def test_copies_and_unpickled_models_read_their_own_tensors(dynamo, folders) -> None:
    """A deep copy (and an unpickled model) registers its own buffers under new keys: the compiled copy
    runs after the original is freed and gives the original's logits."""
    model = _load(folders("qwen3_moe")[0])
    with torch.no_grad():
        expected = model(IDS).logits
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    keys = _keys(model)
    for other in (twin, loaded):
        assert len(_keys(other)) == len(keys)
        assert not _keys(other) & keys
        for m in _experts(other):
            entry = prepared.lookup(m._prepared.key)
            assert entry is m._prepared
            assert entry.absmax is m.absmax
            assert entry.quant_map is m.quant_map
            assert entry.packed is m.packed
    del model
    gc.collect()
    assert not any(k in prepared._ARGS or k in prepared._FINALIZERS for k in keys)
    for other in (twin, loaded):
        compiled = torch.compile(other, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            assert torch.equal(compiled(IDS).logits, expected)
        torch._dynamo.reset()


def test_load_state_dict_loads_and_recompiles(dynamo, folders) -> None:
    """``load_state_dict`` of another layer's expert records stacks them again under a new key (the old
    one released): the compiled model recompiles and gives the new eager logits."""
    model = _load(folders("qwen3_moe")[0])
    first, second = _experts(model)[:2]
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, first.hidden_dim, dtype=torch.bfloat16)
    idx, w = torch.tensor([[0, 1], [2, 3], [1, 2]]), torch.rand(3, 2, dtype=torch.bfloat16)
    with torch.no_grad():
        before = compiled(IDS).logits
        old = first._prepared.key
        first.load_state_dict(second.state_dict())
        assert torch.equal(first.packed, second.packed)
        assert torch.equal(first.absmax, second.absmax)
        assert torch.equal(first(x, idx, w), second(x, idx, w))
        assert first._prepared.key != old
        with pytest.raises(RuntimeError, match=f"no prepared 4-bit weight under key {old}"):
            prepared.lookup(old)
        after = compiled(IDS).logits
        assert torch.equal(after, model(IDS).logits)
        assert not torch.equal(after, before)


def test_load_state_dict_names_missing_and_unexpected_records(folders) -> None:
    model = _load(folders("qwen3_moe")[0])
    layer = _experts(model)[0]
    state = layer.state_dict()
    key = layer._prepared.key
    state.pop("1.down_proj.weight")
    state["9.gate_proj.weight"] = torch.zeros(1)
    result = layer.load_state_dict(state, strict=False)
    assert result.missing_keys == ["1.down_proj.weight"]
    assert result.unexpected_keys == ["9.gate_proj.weight"]
    assert layer._prepared.key == key  # nothing loaded: the layer is as it was
    with pytest.raises(RuntimeError, match="Missing key"):
        layer.load_state_dict(state)
    narrower = _experts(_load(folders("qwen3_moe_i32")[0]))[0].state_dict()  # intermediate 32, not 64
    with pytest.raises(RuntimeError, match=r"'0.gate_proj.weight' has shape \[32, 64\], the model wants"):
        layer.load_state_dict(narrower)
    assert layer._prepared.key == key


def test_moves_and_assigned_buffers_register_anew(folders) -> None:
    """A cast that leaves the buffers keeps the key; an assigned buffer or a device move registers the
    new tensors (meta: nothing registered, the old key released)."""
    model = _load(folders("qwen3_moe")[0])
    layer = _experts(model)[0]
    key = layer._prepared.key
    model.half()
    model.to("cpu")
    assert layer._prepared.key == key
    assert layer.absmax.dtype == torch.float32
    layer.absmax = layer.absmax.clone()
    assert layer._prepared.key != key
    assert prepared.lookup(layer._prepared.key).absmax is layer.absmax
    assert key not in prepared._ARGS
    key = layer._prepared.key
    layer.to("meta")
    assert layer._prepared is None
    assert key not in prepared._ARGS


def _eager_with(layer: torch.nn.Module, packed: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """The layer's eager output with ``packed`` as its codes buffer (put behind it, then restored)."""
    own = layer._buffers["packed"]
    layer._buffers["packed"] = packed
    try:
        return layer(*inputs)
    finally:
        layer._buffers["packed"] = own


def test_freed_or_stale_keys_raise_clear_errors(folders) -> None:
    model = _load(folders("qwen3_moe")[0])
    layer = _experts(model)[0]
    x = torch.randn(2, layer.hidden_dim, dtype=torch.bfloat16)
    idx, w = torch.tensor([[0, 1], [2, 3]]), torch.rand(2, 2, dtype=torch.bfloat16)
    args = (layer.intermediate_dim, layer.blocksize, "silu", True)
    key, packed = layer._prepared.key, layer.packed
    with torch.no_grad():
        expected = layer(x, idx, w)
        assert torch.equal(moe_experts_4bit_keyed(x, idx, w, packed, key, *args), expected)
        # a copy of the codes (torch's cudagraphs backend copies its inputs when it records): the copy
        # is read; other codes of the same shape are read as the eager call reads them
        assert torch.equal(moe_experts_4bit_keyed(x, idx, w, packed.clone(), key, *args), expected)
        other = torch.roll(packed, 1, dims=0)
        assert torch.equal(
            moe_experts_4bit_keyed(x, idx, w, other, key, *args), _eager_with(layer, other, x, idx, w)
        )
        with pytest.raises(ValueError, match=r"registered for experts codes.*load_state_dict"):
            moe_experts_4bit_keyed(x, idx, w, packed[:-1], key, *args)
        del model, layer
        gc.collect()
        with pytest.raises(
            RuntimeError, match=f"no prepared 4-bit weight under key {key}: its layer was freed"
        ):
            moe_experts_4bit_keyed(x, idx, w, packed, key, *args)


def test_exported_program_holds_the_tensors_not_keys(dynamo, folders) -> None:
    """torch.export (strict: dynamo) takes the experts' absmax and code table as inputs, as before the
    keyed op: no key in the program, which runs after its model is freed and gives the eager logits."""

    ops = export_outlives_model(lambda: _load(folders("qwen3_moe")[0]), IDS)
    assert any(op.startswith("quantize_model.moe_experts_4bit.") for op in ops)


def test_compiled_backward_reads_by_key_and_equals_eager(dynamo, folders) -> None:
    """Gradients through a compiled experts layer (input and routing weights; LoRA training around the
    experts) go through the keyed backward op and equal the eager ones bit for bit."""
    layer = _experts(_load(folders("qwen3_moe")[0]))[0]
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, layer.hidden_dim, dtype=torch.bfloat16, generator=gen)
    w0 = torch.rand(5, 2, dtype=torch.bfloat16, generator=gen)
    idx = torch.tensor([[0, 3], [3, 1], [2, 0], [1, 2], [3, 2]])
    grad = torch.randn(5, layer.hidden_dim, dtype=torch.bfloat16, generator=gen)
    ops: list[str] = []

    def recording(gm: torch.fx.GraphModule, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    compiled = torch.compile(layer, fullgraph=True, backend=aot_autograd(fw_compiler=recording))
    results = []
    for fn in (layer, compiled):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = fn(x, idx, w)
        y.backward(grad)
        results.append((y.detach(), x.grad, w.grad))
    assert any(op.startswith("quantize_model.moe_experts_4bit_keyed") for op in ops)
    assert any(op.startswith("quantize_model.moe_experts_4bit_backward_keyed") for op in ops)
    for eager, traced in zip(*results, strict=True):
        assert torch.equal(eager, traced)
