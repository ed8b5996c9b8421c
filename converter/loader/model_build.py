"""The transformers class the loader builds for a config, shared by load_quantized (model.py), its
warm-up (warmup.py) and dequantize_checkpoint (dequantize.py), none of which imports another for it."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from converter.errors import InputError


class ModelBuildError(InputError):
    """transformers cannot build the model named by config.json, or the shards do not fill it."""


def class_to_build(
    config: Any,
    folder: Path | None = None,
    *,
    trust_remote_code: bool = False,
    keys: Collection[str] | None = None,
) -> type:
    """The class to build: the converter's lookup (``converter.plan.model_class``: the class named by
    ``architectures``, the same head for a name transformers lacks, else the head the checkpoint
    ``keys`` fill), then repository code when trusted."""
    from converter.plan.model_class import model_class

    cls = model_class(config, getattr(config, "architectures", None) or (), keys)
    if cls is not None:
        return cls
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and folder is not None:
        # repository code (config.json "auto_map"), run only because the caller trusts it
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        for auto in ("AutoModelForCausalLM", "AutoModel"):
            if isinstance(auto_map.get(auto), str):
                return get_class_from_dynamic_module(auto_map[auto], str(folder))
    msg = f"transformers has no model class for model_type {config.model_type!r}"
    if auto_map and not trust_remote_code:
        msg += " (config.json names repository code in auto_map: pass trust_remote_code=True to run it)"
    raise ModelBuildError(msg)
