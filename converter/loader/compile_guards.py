"""Fewer dynamo guards for a compiled model with 4-bit layers: none on their prepared kernel tensors.

Since round 34 the fused-GEMV path reads those tensors by key (``converter/kernels/prepared.py``), so a
plain ``torch.compile`` no longer guards them there; this filter still drops the guards on the 4-bit
weights themselves and on what the many-token (dequantize) path reads. The history:

Before every call of a ``torch.compile``'d function dynamo checks its guards. A loaded SmolLM2-135M has
210 4-bit layers and each hands 5 tensors of its prepared kernel arguments (``layer._kernel_args``:
packed codes, absmax or the nested record, the maps) to the graph and reads its packed weight (to check
that the arguments were made for it), so 1260 of the model's 1415 tensor guards (dtype, device, shape,
strides, dispatch keys of each) are on those (docs/benchmarks.md, "CPU compiled decode (cpucompile)").

:func:`skip_prepared_tensor_guards` is a ``guard_filter_fn`` (``torch.compile(...,
options={"guard_filter_fn": ...})``) that drops exactly those tensor guards and keeps every other one.
Why that is safe: the graph reads those tensors from the layer at every call (graph inputs, not
constants), and everything their metadata follows is guarded elsewhere:

- they are made by ``ops.prepare`` from the layer's weight, whose identity is guarded (an ``ID_MATCH``
  from ``id(weight)`` in the layer's traced forward, ``module._traced_forward``; before, ``weight is
  _prepared_for``): a replaced weight is seen, and the same weight object keeps its metadata;
- their shapes follow the layer's in/out features and blocksize, their dtypes are fixed by ``prepare``
  (uint8 codes, float32 absmax and maps); which of absmax or the nested record is present is guarded by
  the ``is None`` guard on the absent one;
- their device is the model's: a moved model fails the tensor guards of its other parameters (norms,
  embeddings), which are kept;
- inductor's own size and stride asserts on every graph input (``size_asserts``, on by default) still
  run at each call: a tensor of another shape raises instead of running.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: Guard kinds that check one tensor's metadata (the tensor is still a graph input read at each call).
TENSOR_GUARD_TYPES = frozenset({"TENSOR_MATCH", "DIMENSION_DYNAMIC_MARKING_GUARD", "NO_TENSOR_ALIASING"})

#: Source text of a 4-bit layer's prepared kernel arguments (converter.loader.module.QuantLinear4bit).
PREPARED_SOURCE = "._kernel_args."

#: Source text of a layer's weight (the 4-bit one is a buffer: QuantLinear4bit._set_weight).
WEIGHT_SOURCE = "._buffers['weight']"


def _prepared(entry: Any) -> bool:
    if entry.guard_type not in TENSOR_GUARD_TYPES:
        return False
    if PREPARED_SOURCE in entry.name:
        return True
    # the 4-bit weight itself: its identity is guarded (ID_MATCH: module._traced_forward)
    return entry.name.endswith(WEIGHT_SOURCE) and hasattr(entry.value, "quant_state")


def skip_prepared_tensor_guards(entries: Sequence[Any]) -> list[bool]:
    """``guard_filter_fn``: keep every guard except the tensor guards on 4-bit layers' prepared tensors
    and packed weights."""
    return [not _prepared(e) for e in entries]


def compile_options() -> dict[str, Any]:
    """``torch.compile`` options for a model with 4-bit layers (see the module docstring); none before
    torch 2.13 (:func:`guard_filter_supported`)."""
    return {"guard_filter_fn": skip_prepared_tensor_guards} if guard_filter_supported() else {}


def guard_filter_supported() -> bool:
    """Whether this torch's dynamo builds a ``guard_filter_fn``'s entries for a transformers 5.2x model.

    torch 2.11's asserts "Guarded object must be identical" on the first call (it keeps each guarded
    object alive while it builds the entries, and ``config.per_layer_config`` returns a new object per
    read); 2.13's does not. Without the filter the guards it would drop stay, which since the keyed ops
    is a few per layer (docs/benchmarks.md round 36)."""
    import torch

    return torch.torch_version.TorchVersion(torch.__version__) >= (2, 13)
