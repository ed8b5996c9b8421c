"""Helpers for tests that read dynamo's guards (shared by the loader and MoE compile tests)."""

from __future__ import annotations

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
