"""Hub calls with a bounded retry loop, and huggingface_hub's errors mapped to converter.errors.

Shared by the Hub source (converter/sources/hub.py) and the push (converter/tools/push.py).
huggingface_hub already retries some requests; HubClient.call adds a loop around every call we make
for 5xx, 408, 429 (honouring Retry-After) and dropped connections, and turns every other failure into
a one-line converter.errors exception that says what to do.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

import httpx2  # huggingface_hub 2.x's HTTP client; its transport errors are retried
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    SafetensorsParsingError,
)

from converter.errors import ConversionFailedError, CorruptFileError, InputError, SourceNotFoundError

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: Longest Retry-After (seconds) we honour; a longer one is capped so a run never stalls for hours.
MAX_RETRY_AFTER = 60.0

T = TypeVar("T")


# --- errors ------------------------------------------------------------------------------------
class HubRepoNotFoundError(SourceNotFoundError):
    """The repo does not exist on the endpoint (or is private and we have no access)."""


class HubRepoNotCachedError(SourceNotFoundError):
    """HF_HUB_OFFLINE=1 and the repo is not in the local Hugging Face cache at all."""


class HubRevisionNotFoundError(SourceNotFoundError):
    """The branch, tag or commit does not exist in the repo."""


#: What an upload (push) says under HF_HUB_OFFLINE=1: there is no cache to fall back on.
OFFLINE_PUSH = "HF_HUB_OFFLINE=1 forbids uploads; unset HF_HUB_OFFLINE to push"


class HubAccessError(InputError):
    """Gated repo without access, or a token the Hub rejects."""


class DiskTooSmallError(InputError):
    """The plan needs more free disk than there is (checked before anything is downloaded)."""


class HubDownloadError(ConversionFailedError):
    """The Hub kept failing (after retries), or a download did not match its sha256."""


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    value = response.headers.get("Retry-After") if response is not None else None
    try:
        return min(MAX_RETRY_AFTER, float(value)) if value is not None else None
    except ValueError:
        return None


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, OfflineModeIsEnabled):
        return False
    if isinstance(exc, (RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError)):
        return False
    if isinstance(exc, HfHubHTTPError):
        return _status(exc) in TRANSIENT_STATUS
    if isinstance(exc, (httpx2.TransportError, ConnectionError)):
        return True
    if isinstance(exc, OSError) and "Consistency check failed" in str(exc):  # truncated body
        return True
    if isinstance(exc, LocalEntryNotFoundError):  # the HEAD call failed and nothing is cached
        cause = exc.__cause__
        return cause is not None and _is_transient(cause)
    return False


def _short(exc: BaseException) -> str:
    status = _status(exc)
    if status is not None:
        return f"HTTP {status}"
    cause = exc.__cause__
    if isinstance(exc, LocalEntryNotFoundError) and cause is not None:
        return _short(cause)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]


class _DownloadCancelledError(Exception):
    """Raised inside hf_hub_download's progress callback to abort a download after close()."""


class HubClient:
    """The Hub calls we make, each with a bounded retry loop and errors mapped to converter.errors."""

    def __init__(
        self,
        repo_id: str,
        *,
        token: str | bool | None,
        endpoint: str | None,
        attempts: int = 5,
        base_delay: float = 0.5,
        max_delay: float = 8.0,
        write: bool = False,
    ) -> None:
        self.repo_id = repo_id
        self.write = write
        self.token = token
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        self.api = HfApi(endpoint=self.endpoint, token=token)
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.revision: str | None = None

    def call(self, what: str, fn: Callable[[], T], *, file: str | None = None) -> T:
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as exc:
                if not _is_transient(exc) or attempt == self.attempts:
                    raise self.map_error(exc, what, file=file, attempts=attempt) from exc
                delay = _retry_after(exc)
                if delay is None:
                    delay = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
                time.sleep(delay)
        raise AssertionError  # unreachable

    def _has_token(self) -> bool:
        """Whether a token goes with the requests: the one given, else HF_TOKEN or the stored login."""
        if isinstance(self.token, str):
            return bool(self.token)
        if self.token is False:
            return False
        from huggingface_hub import get_token

        return bool(get_token())

    def map_error(
        self, exc: BaseException, what: str, *, file: str | None = None, attempts: int = 1
    ) -> Exception:
        repo = self.repo_id
        login = "run `hf auth login` or set HF_TOKEN" + (" (a token with write access)" if self.write else "")
        if isinstance(exc, GatedRepoError):
            return HubAccessError(
                f"{repo}: gated repo; request access at {self.endpoint}/{repo}, "
                f"then {login} with an account that has it"
            )
        if isinstance(exc, RepositoryNotFoundError):
            return HubRepoNotFoundError(
                f"{repo}: repository not found on {self.endpoint}; "
                f"check the repo id, or if it is private {login}"
            )
        if isinstance(exc, RevisionNotFoundError):
            return HubRevisionNotFoundError(
                f"{repo}: revision {self.revision!r} not found; "
                "give an existing branch, tag or commit to --revision"
            )
        if isinstance(exc, RemoteEntryNotFoundError):
            return SourceNotFoundError(
                f"{repo}: file {file!r} not found at {self.revision}; the repo is incomplete"
            )
        if isinstance(exc, SafetensorsParsingError):
            return CorruptFileError(
                f"{repo}: {file}: not a valid safetensors header ({_short(exc)}); report it to the repo owner"
            )
        status = _status(exc)
        if status == 401:
            if not self._has_token():  # CI: the secret was not passed to this job
                return HubAccessError(
                    f"{repo}: no Hugging Face token is set and the Hub asks for one (HTTP 401); {login}"
                )
            return HubAccessError(
                f"{repo}: the Hub rejected the token (HTTP 401); {login} with a valid token"
            )
        if status == 403:
            if self.write:  # an upload: the token reads, but may not write there
                return HubAccessError(
                    f"{repo}: access denied (HTTP 403): the token may not write to this repo; run `hf auth "
                    "login` or set HF_TOKEN with a token that has write access to it (a fine-grained token "
                    "needs write permission on the repo or its organization)"
                )
            return HubAccessError(
                f"{repo}: access denied (HTTP 403) to {file or 'the repo'}; "
                f"{login} with a token that can read it"
            )
        if self.write and constants.is_offline_mode():  # an upload has no cache to fall back on
            return HubAccessError(f"{repo}: {OFFLINE_PUSH}")
        if isinstance(exc, (OfflineModeIsEnabled,)) or (
            isinstance(exc, LocalEntryNotFoundError) and constants.is_offline_mode()
        ):
            return (SourceNotFoundError if file else HubRepoNotCachedError)(
                f"{repo}: {file + ' is' if file else 'the repo is'} not in the local Hugging Face cache and "
                "HF_HUB_OFFLINE=1; "
                "unset HF_HUB_OFFLINE to download it"
            )
        target = f"{file} " if file else ""
        return HubDownloadError(
            f"{repo}: {what} {target}failed after {attempts} attempt(s) ({_short(exc)}); "
            "check the connection and rerun the same command "
            + ("(files already uploaded are not sent again)" if self.write else "(finished shards are kept)")
        )
