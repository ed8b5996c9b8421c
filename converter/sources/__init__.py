"""Checkpoint sources: a local folder or file, or a Hugging Face Hub repo.

``open_source(spec)`` picks one: an existing local path gives a LocalSource; otherwise a string
shaped like a Hub repo id (``name`` or ``namespace/name``) gives a HubSource.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from converter.errors import InputError, SourceNotFoundError
from converter.sources.base import Source, TensorInfo

__all__ = ["Source", "TensorInfo", "looks_like_repo_id", "not_a_local_path_either", "open_source"]

# Hub repo ids: "name" or "namespace/name"; letters, digits, '-', '_', '.'; no leading '.'/'-',
# no '--' or '..' (huggingface_hub's validate_repo_id rules).
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


def looks_like_repo_id(spec: str) -> bool:
    return bool(_REPO_ID.match(spec)) and "--" not in spec and ".." not in spec and not spec.endswith(".")


def not_a_local_path_either(exc: Exception, spec: str) -> Exception:
    """``exc`` (the Hub has no such repo, or offline none is cached) saying that ``spec`` was looked for
    as a local path too: `models/llama` run from another folder than meant was told the Hub's answer
    alone ("repository not found", offline "unset HF_HUB_OFFLINE to download it")."""
    return type(exc)(f"{exc}; as a local path, {Path(spec).expanduser().absolute()} does not exist either")


def open_source(
    spec: str | Path,
    *,
    revision: str | None = None,
    keep_downloads: bool = False,
    allow_pickle: bool = False,
    **hub_options: Any,
) -> Source:
    """Open ``spec`` as a checkpoint source.

    ``hub_options`` (token, cache_dir, ...) go to HubSource only. Raises SourceNotFoundError when
    ``spec`` is neither an existing path nor shaped like a Hub repo id.
    """
    path = Path(spec).expanduser()
    if path.exists():
        from converter.sources.local import LocalSource

        if revision is not None:
            msg = f"--revision {revision!r} applies to Hub repos only, but {str(spec)!r} is a local path"
            raise SourceNotFoundError(msg)
        if keep_downloads:  # nothing is downloaded: refused as --revision is, not ignored without a word
            msg = (
                f"--keep-downloads applies to Hub repos only (it keeps their downloaded files), but "
                f"{str(spec)!r} is a local path, which is read in place; leave it out"
            )
            raise InputError(msg)
        return LocalSource(path, allow_pickle=allow_pickle)
    text = str(spec)
    if isinstance(spec, str) and looks_like_repo_id(text):
        from converter.sources.hub import HubSource
        from converter.sources.hub_client import HubRepoNotCachedError, HubRepoNotFoundError

        try:
            return HubSource(
                text,
                revision=revision,
                keep_downloads=keep_downloads,
                allow_pickle=allow_pickle,
                **hub_options,
            )
        except (HubRepoNotFoundError, HubRepoNotCachedError) as exc:
            raise not_a_local_path_either(exc, text) from None
    msg = (
        f"{text}: no such file or folder, and not a Hub repo id (namespace/name); "
        "check the path or give a repo id"
    )
    raise SourceNotFoundError(msg)
