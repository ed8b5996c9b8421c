"""``model.hf_quantizer`` / ``model.is_quantized`` on a model from ``load_quantized``, as transformers'
``from_pretrained`` sets them on a bitsandbytes model.

transformers reads them to decide what a quantized model may do; the one that matters here is
``Trainer``'s check at construction (``transformers.trainer_utils.validate_quantization_for_training``):
a quantized model with no adapters is refused with "You cannot perform fine-tuning on purely quantized
models. Please attach trainable adapters...", where without the attributes training started and failed
in the first backward with torch's "element 0 of tensors does not require grad". A PEFT model (or one
with ``model.add_adapter``) passes, the quantizer being trainable.

What else reads the attributes behaves as before:

- ``.half()`` / ``.float()``, which transformers refuses on a quantized model, keep casting the 16-bit
  tensors (our layers keep their 4-bit codes and float32 scales): the model's own ``half`` / ``float``
  are bound here to ``nn.Module``'s (transformers' ``.to(dtype)`` reads ``quantization_method``,
  which stays unset, as before);
- ``generate``'s automatic compilation (``is_compileable``: True) and ``save_pretrained``
  (``is_serializable``: True, the state dict our layers write);
- ``model.dequantize()`` is ours (converter/loader/dequantize_inplace.py) and removes all of this.

transformers is imported by this module: only load_quantized imports it.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer


class LoadedQuantizer(HfQuantizer):
    """The ``hf_quantizer`` of a model from ``load_quantized``: its layers are already quantized (our
    own modules), so it quantizes nothing; it answers what transformers asks a quantizer about a loaded
    model (trainable with adapters, serializable, compileable)."""

    def __init__(self, quantization_config: Any) -> None:
        super().__init__(quantization_config, pre_quantized=True)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # with adapters: Trainer refuses the model alone (module docstring)

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        from converter.loader.dequantize_inplace import dequantize_model

        return dequantize_model(model, dtype)


class _BoundCast:
    """``model.half`` / ``model.float``: ``nn.Module``'s cast (an object, so that deepcopy and pickle keep
    it pointing at the copy)."""

    def __init__(self, model: nn.Module, name: str) -> None:
        self.model, self.name = model, name

    def __call__(self) -> nn.Module:
        return getattr(nn.Module, self.name)(self.model)


def attach_quantizer(model: nn.Module) -> None:
    """Set ``hf_quantizer`` and ``is_quantized`` on ``model`` (module docstring)."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if not hasattr(config, "quant_method"):  # none, or a dict transformers could not build a config from
        method = config.get("quant_method", "bitsandbytes") if isinstance(config, dict) else "bitsandbytes"
        config = SimpleNamespace(quant_method=method)
    model.hf_quantizer = LoadedQuantizer(config)
    model.is_quantized = True
    model.half = _BoundCast(model, "half")  # type: ignore[method-assign]
    model.float = _BoundCast(model, "float")  # type: ignore[method-assign]
