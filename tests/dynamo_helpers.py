"""Helpers for tests that read dynamo's guards and exported programs (shared by the loader and MoE
compile tests)."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

#: What torch 2.11's dynamo raises while building a ``guard_filter_fn``'s entries on transformers >= 5.24
#: models: their ``config.per_layer_config`` makes a new view object per read, and the guards of the
#: filter's first build keep the first one ("Guarded object must be identical"). torch 2.13 (CI's)
#: builds them.
_GUARD_FILTER_ASSERT = "Guarded object must be identical"


def trace_guards(model: torch.nn.Module, *args: Any) -> tuple[list[str] | None, list[str], int]:
    """(source names of the tensor guards, op names in the graph, graph inputs) of one
    ``torch.compile(model, fullgraph=True)`` call on ``args``, without gradients.

    The names are None where this torch cannot build guards through a ``guard_filter_fn``
    (:data:`_GUARD_FILTER_ASSERT`): the ops and inputs then come from the same trace without the filter,
    so a test still checks the graph there and skips only its guard part (:func:`guard_names_or_skip`)."""
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

    with torch.no_grad():
        try:
            torch.compile(model, fullgraph=True, backend=backend, options={"guard_filter_fn": record})(*args)
        except AssertionError as exc:
            if _GUARD_FILTER_ASSERT not in str(exc):
                raise
            # the graph was made before the guards failed: trace it again, unfiltered, to read it
            torch._dynamo.reset()
            ops.clear()
            inputs.clear()
            torch.compile(model, fullgraph=True, backend=backend)(*args)
            assert len(inputs) == 1, f"{len(inputs)} graphs"
            return None, ops, inputs[0]
    assert len(inputs) == 1, f"{len(inputs)} graphs"
    return names, ops, inputs[0]


def guard_names_or_skip(names: list[str] | None) -> list[str]:
    """``names`` from :func:`trace_guards`; skips the rest of the test where they are None (torch 2.11)."""
    if names is None:
        pytest.skip(
            f"torch {torch.__version__}'s dynamo cannot build guards through a guard_filter_fn on "
            f"transformers >= 5.24 models ('{_GUARD_FILTER_ASSERT}'; torch 2.13 can): the graph was "
            "checked, the guard names were not"
        )
    return names


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
