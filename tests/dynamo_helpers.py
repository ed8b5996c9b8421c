"""Helpers for tests that read dynamo's guards and exported programs (shared by the loader and MoE
compile tests)."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch


def call_with_guard_filter(compiled: Callable[..., Any], *args: Any) -> Any:
    """``compiled(*args)`` for a model compiled with a ``guard_filter_fn``. torch 2.11's dynamo raises an
    AssertionError while building such guards on transformers >= 5.24 models: their
    ``config.per_layer_config`` makes a new view object per read, and the filter's entries keep the first
    alive ("Guarded object must be identical"); torch 2.13 (CI's) builds them. Those tests skip there."""
    try:
        return compiled(*args)
    except AssertionError as exc:
        if "Guarded object must be identical" not in str(exc):
            raise
        pytest.skip(f"this torch's dynamo cannot build guards through a guard_filter_fn here: {exc}")


def trace_guards(model: torch.nn.Module, *args: Any) -> tuple[list[str], list[str], int]:
    """(source names of the tensor guards, op names in the graph, graph inputs) of one
    ``torch.compile(model, fullgraph=True)`` call on ``args``, without gradients."""
    names: list[str] = []
    ops: list[str] = []
    inputs: list[int] = []

    def record(entries):
        names.extend(e.name for e in entries if e.guard_type == "TENSOR_MATCH")
        return [True] * len(entries)

    def backend(gm: torch.fx.GraphModule, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        inputs.append(len(example_inputs))
        return gm.forward

    compiled = torch.compile(model, fullgraph=True, backend=backend, options={"guard_filter_fn": record})
    with torch.no_grad():
        call_with_guard_filter(compiled, *args)
    assert len(inputs) == 1, f"{len(inputs)} graphs"
    return names, ops, inputs[0]


class _Logits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, use_cache=False).logits


def export_outlives_model(load: Callable[[], torch.nn.Module], ids: torch.Tensor) -> list[str]:
    """The op names of ``torch.export`` (strict: dynamo) of the logits of the model ``load()`` makes, after
    checking that no keyed op is in the program (keys are this process's: a saved program would read no
    or other layers' tensors) and that it runs after its model is freed, giving the eager logits."""
    model = load()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = model(ids).logits
        program = torch.export.export(_Logits(model), (ids,), strict=True)
    ops = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert not any("keyed" in op for op in ops)
    del model
    gc.collect()
    with torch.no_grad():
        assert torch.equal(program.module()(ids), expected)
    return ops
