"""A converted folder's ``config.json``, read once with one clear error naming the file.

transformers, and the loader's own reads of ``quantization_config``, would otherwise fail on a damaged
config with a bare ``JSONDecodeError`` or ``AttributeError`` far from the cause.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from converter.errors import CorruptFileError

CONFIG_NAME = "config.json"
_FIX = "restore it from the source checkpoint or convert again"


def read_config(folder: Path) -> dict[str, Any] | None:
    """``folder/config.json`` as a dict (None when there is none); ``CorruptFileError`` naming the file
    when it is not a JSON object or its ``quantization_config`` is not one."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        msg = f"{path}: not valid JSON ({exc}); {_FIX}"
        raise CorruptFileError(msg) from None
    if not isinstance(config, dict):
        msg = f"{path}: a JSON object is expected, found {type(config).__name__}; {_FIX}"
        raise CorruptFileError(msg)
    qc = config.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        msg = f"{path}: 'quantization_config' must be an object, found {type(qc).__name__}; {_FIX}"
        raise CorruptFileError(msg)
    return config


def config_error(folder: Path, key: str, problem: str) -> CorruptFileError:
    """The error for one bad ``quantization_config`` field of ``folder/config.json``."""
    return CorruptFileError(f"{Path(folder) / CONFIG_NAME}: quantization_config.{key} {problem}; {_FIX}")
