"""docs/python-api.md (and hub.md) against the public API: every parameter of every function and class
they document is named there (tests/cli/test_help.py does the same for the command's options and
docs/cli.md)."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).parents[2] / "docs"
DOC = (DOCS / "python-api.md").read_text() + (DOCS / "hub.md").read_text()

#: module:name of the API python-api.md documents, and the parameters it need not name (generate()'s
#: custom_generate protocol: transformers passes them, the user never does)
PUBLIC = {
    "converter:convert": (),
    "converter:load_quantized": (),
    "converter:load_quantized_state": (),
    "converter:replace_linear_layers": (),
    "converter:graphed_greedy": (
        "model", "input_ids", "logits_processor", "stopping_criteria", "generation_config",
        "synced_gpus", "streamer", "model_kwargs",
    ),
    "converter.loader:dequantize_checkpoint": (),
    "converter.loader:dequantize_model": (),
    "converter.loader:register_lora": (),
    "converter.loader:compile_options": (),
    "converter.loader:Linear4bit": (),
    "converter.loader:Linear8bit": (),
    "converter.loader.lora:check_targets": (),
    "converter.loader.estimate:estimate": (),
    "converter.loader.footprint:memory_by_device": (),
    "converter.tools.plan_file:load_plan": (),
    "converter.tools.plan_file:select_part": (),
    "converter.tools.batch_run:run_batch": (),
    "converter.tools.junit:junit_xml": (),
    "converter.tools.push:push_folder": (),
}  # fmt: skip


@pytest.mark.parametrize("target", sorted(PUBLIC))
def test_every_parameter_of_the_documented_api_is_named(target: str) -> None:
    """load_plan's cli_options and junit_xml's suite were in no doc."""
    module, name = target.split(":")
    obj = getattr(importlib.import_module(module), name)
    assert re.search(rf"\b{name}\b", DOC), f"{target} is not in docs/python-api.md or hub.md"
    params = [p for p in inspect.signature(obj).parameters if p != "self" and p not in PUBLIC[target]]
    missing = [p for p in params if not re.search(rf"(?<![\w.]){p}\b", DOC)]
    assert not missing, f"{target}: {missing} not in docs/python-api.md or hub.md"
