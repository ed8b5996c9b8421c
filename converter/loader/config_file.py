"""A converted folder's ``config.json``, read once with one clear error naming the file.

transformers, and the loader's own reads of ``quantization_config``, would otherwise fail on a damaged
config with a bare ``JSONDecodeError`` or ``AttributeError`` far from the cause.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from converter.errors import CorruptFileError, InputError
from converter.user_frame import user_stacklevel
from formats.index import INDEX_NAME, Index, edited_files

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


@contextlib.contextmanager
def config_edits_named(
    folder: Path, index: Index | None, mismatch: tuple[type[InputError], ...]
) -> Iterator[list[str]]:
    """Compare ``config.json`` (and a copied ``generation_config.json``) of ``folder`` with the sha256
    its ``index`` records of them (None: nothing checked, as for ``verify=False`` or an index written
    before they were recorded) and yield the names that differ. An edit may be legitimate (rope
    scaling, generation defaults), so it is one warning naming the files, not a refusal; an error of
    the ``mismatch`` types the block raises (the load's errors of a config that no longer describes the
    shards, not a damaged shard's) says that config.json was edited. The warning names the user's call."""
    # a missing config.json is the load's own error (no config.json, or an unfinished conversion)
    edited = edited_files(index, skip_missing=(CONFIG_NAME,)) if index is not None else []
    if edited:
        them = " and ".join(edited)
        were, it = ("were", "them") if len(edited) > 1 else ("was", "it")
        removed = " or removed" if any(not (Path(folder) / name).is_file() for name in edited) else ""
        warnings.warn(
            f"{folder}: {them} {were} changed{removed} after the conversion wrote {it} "
            f"(the sha256 {INDEX_NAME} records differs); loading the folder as it is now. "
            f"`quantize-model verify {folder}` reports the details",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    try:
        yield edited
    except InputError as exc:
        note = config_edit_note(edited)
        if not note or type(exc) not in mismatch:
            raise
        msg = f"{exc}; {note}"
        raise type(exc)(msg) from exc


def config_edit_note(edited: list[str]) -> str:
    """What a load error adds when ``config.json`` is among the ``edited`` files ("" when not)."""
    if CONFIG_NAME not in edited:
        return ""
    return (
        f"{CONFIG_NAME} was changed after the conversion wrote it (the sha256 {INDEX_NAME} records "
        f"differs): the edit may be the cause; {_FIX}"
    )
