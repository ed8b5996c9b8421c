"""torch.compile on the loader's 4-bit layers: custom ops, fullgraph with no graph break, eager results.

``make test`` sets TORCHDYNAMO_DISABLE=1 (compiling everything would make the suite slow); the
``dynamo`` fixture switches dynamo back on for these tests only, and each test checks that dynamo
really compiled a graph (``unique_graphs``), so a run where compilation silently stays off fails.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from loader_helpers import assert_compiled_without_breaks, make_layer

from converter.kernels import custom_ops
from converter.loader import ops
from converter.loader.model import load_quantized

IDS = torch.tensor([[1, 5, 9, 33, 2, 200, 7, 64]])


def _layer_args(nested: bool) -> tuple[torch.nn.Module, ops.KernelArgs]:
    layer, _, _ = make_layer(48, 128, nested=nested, blocksize=64)
    return layer, layer._kernel_args


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_ops_pass_opcheck(nested: bool) -> None:
    """Schema, fake implementation and dispatch of each op agree (torch.library.opcheck)."""
    _, a = _layer_args(nested)
    absmax = (a.absmax, a.codes, a.nested_absmax, a.nested_map, a.offset)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    torch.library.opcheck(
        torch.ops.quantize_model.gemv_4bit.default, (x, a.packed, *absmax, a.quant_map, 48, 64)
    )
    torch.library.opcheck(
        torch.ops.quantize_model.dequantize_4bit.default,
        (a.packed, *absmax, a.quant_map, 48 * 128, 64, torch.float16),
    )
    if nested:
        torch.library.opcheck(
            torch.ops.quantize_model.dequantize_nested.default,
            (a.codes, a.nested_absmax, a.nested_map, a.offset),
        )


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_op_equals_eager_implementation(nested: bool) -> None:
    """The dispatcher route (compiled code) and the direct route (eager) run the same kernel: same bits."""
    layer, a = _layer_args(nested)
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    via_op = torch.ops.quantize_model.gemv_4bit(
        x, a.packed, a.absmax, a.codes, a.nested_absmax, a.nested_map, a.offset, a.quant_map, 48, 64
    )
    assert torch.equal(via_op, custom_ops.IMPLS["cpu"]["gemv_4bit"](
        x, a.packed, a.absmax, a.codes, a.nested_absmax, a.nested_map, a.offset, a.quant_map, 48, 64
    ))  # fmt: skip
    with torch.no_grad():
        assert torch.equal(via_op, layer(x))
    w = torch.ops.quantize_model.dequantize_4bit(
        a.packed, a.absmax, a.codes, a.nested_absmax, a.nested_map, a.offset, a.quant_map, 48 * 128, 64,
        torch.bfloat16,
    )  # fmt: skip
    assert torch.equal(w.view(48, 128), layer.dequantize(torch.bfloat16))


def test_op_refuses_x_on_another_device_or_shape() -> None:
    _, a = _layer_args(False)
    args = (a.packed, a.absmax, None, None, None, 0.0, a.quant_map, 48, 64)
    with pytest.raises(ValueError, match=r"takes \[1\.\.8, 128\]"):
        torch.ops.quantize_model.gemv_4bit(torch.randn(9, 128), *args)
    with pytest.raises(ValueError, match=r"x is on meta but the 4-bit weight is on cpu"):
        custom_ops.IMPLS["cpu"]["gemv_4bit"](torch.empty(1, 128, device="meta"), *args)


@pytest.mark.parametrize("tokens", [1, 12], ids=["gemv", "dequantize"])
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_layer_compiles_fullgraph_with_inductor(dynamo, nested: bool, tokens: int) -> None:
    layer, _, _ = make_layer(48, 128, nested=nested, blocksize=64, bias=True)
    x = torch.randn(tokens, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True)(x)
    assert_compiled_without_breaks(dynamo)
    # The same kernel runs in both; inductor's bias add computes in float32 and rounds once to
    # bfloat16, as eager's add does: the same bits.
    assert torch.equal(compiled, eager)


def _load(folder: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_quantized(folder)


@pytest.mark.parametrize("tokens", [1, 8, 12], ids=["gemv-1", "gemv-8", "dequantize"])
def test_model_compiles_fullgraph_with_the_eager_logits(dynamo, our_folder: Path, tokens: int) -> None:
    """The whole loaded model: one graph, no break; aot_eager runs the same ATen ops, so the same bits."""
    model = _load(our_folder)
    ids = IDS[:, :tokens] if tokens <= IDS.shape[1] else IDS.repeat(1, 2)[:, :tokens]
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits
    assert_compiled_without_breaks(dynamo)
    assert torch.equal(compiled, eager)


def test_explain_counts_no_graph_break(dynamo, our_folder: Path) -> None:
    model = _load(our_folder)
    with torch.no_grad():
        report = torch._dynamo.explain(model)(IDS[:, :1])
    assert report.graph_count == 1
    assert report.graph_break_count == 0, report.break_reasons


def test_generate_static_cache_compiled_gives_the_eager_tokens(dynamo, our_folder: Path) -> None:
    """generate() with a static cache and a compiled forward (fullgraph): the eager greedy tokens."""
    model = _load(our_folder)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "cache_implementation": "static"}
    with torch.no_grad():
        eager = model.generate(IDS, **kwargs)
        model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
        compiled = model.generate(IDS, **kwargs, disable_compile=True)
    assert_compiled_without_breaks(dynamo)
    assert torch.equal(compiled, eager)  # the same ATen ops and kernels: the same logits, same tokens


def test_missing_extension_warns_once_naming_the_fix(
    our_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source checkout without the built extension runs plain torch code: said once, with the fix."""
    monkeypatch.setattr(ops, "_kernels", lambda: None)
    monkeypatch.setattr(ops, "_backends", lambda: {})
    monkeypatch.setattr(ops, "_warned", set())
    with pytest.warns(
        RuntimeWarning, match=r"converter\._kernels is missing.*pip install --no-build-isolation"
    ):
        model = load_quantized(our_folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second load says nothing more
        load_quantized(our_folder)
    layer = next(m for m in model.modules() if hasattr(m, "_kernel_args"))
    assert layer._kernel_args.impls is None  # the torch path, whose logits are tested elsewhere
    with torch.no_grad():
        assert model(IDS).logits.isfinite().all()
