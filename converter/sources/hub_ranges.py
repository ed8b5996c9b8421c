"""HTTP range reads of one Hub repo at one commit: what ``inspect`` and a header-only ``estimate`` read
instead of downloading shards (a safetensors header, a quant state, a code table)."""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from converter.errors import CorruptFileError

__all__ = ["MERGE_GAP", "WORKERS", "RangeReader", "merge_spans"]

#: Spans at most this many bytes apart are read by one request, the bytes between them coming along:
#: a request costs a round trip (two through the Hub's CDN redirect), 64 KiB about a millisecond of
#: transfer. It bounds the over-read per request saved.
MERGE_GAP = 64 << 10
#: Range requests of one ``get_spans`` in flight at once.
WORKERS = 8


def merge_spans(spans: Iterable[tuple[int, int]], gap: int = MERGE_GAP) -> list[tuple[int, int]]:
    """The ``(start, end)`` byte spans sorted and merged where they overlap, touch, or lie at most
    ``gap`` bytes apart; empty spans are dropped."""
    merged: list[list[int]] = []
    for a, b in sorted(spans):
        if b <= a:
            continue
        if merged and a - merged[-1][1] <= gap:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


class RangeReader:
    """HTTP range reads of one repo at one commit (retries and one-line errors: HubClient)."""

    def __init__(self, repo_id: str, revision: str | None, token: str | bool | None) -> None:
        from converter.sources.hub_client import HubClient

        self.client = HubClient(repo_id, token=token, endpoint=None)
        self.client.revision = revision or "main"
        self.repo_id = repo_id
        info = self.client.call("model info", lambda: self.client.api.model_info(repo_id, revision=revision))
        self.commit = info.sha
        self.files = sorted(s.rfilename for s in info.siblings or [])
        self.bytes_read = 0
        self._lock = threading.Lock()  # bytes_read, from get_spans' threads

    def get(self, file: str, start: int | None = None, length: int | None = None) -> bytes:
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        timeout = float(constants.HF_HUB_DOWNLOAD_TIMEOUT)
        url = hf_hub_url(self.repo_id, file, revision=self.commit, endpoint=self.client.endpoint)
        headers = build_hf_headers(token=self.client.token)
        if start is not None and length is not None:
            if length == 0:
                return b""
            headers["Range"] = f"bytes={start}-{start + length - 1}"
            what = f"range read of bytes {start}-{start + length - 1} of"
        else:
            what = "read of"

        def fetch() -> bytes:
            # huggingface_hub's client has no timeout: a stalled connection times out and is retried
            r = get_session().get(url, headers=headers, follow_redirects=True, timeout=timeout)
            hf_raise_for_status(r)
            if length is not None and len(r.content) != length:
                msg = f"short range read of {file} ({len(r.content)} of {length} bytes)"
                raise OSError(msg)
            return r.content

        data = self.client.call(what, fetch, file=file)
        with self._lock:
            self.bytes_read += len(data)
        return data

    def get_spans(
        self,
        file: str,
        spans: Iterable[tuple[int, int]],
        *,
        gap: int | None = None,
        workers: int | None = None,
    ) -> list[tuple[int, bytes]]:
        """``(start, data)`` blocks of ``file`` that cover every ``(start, end)`` span, sorted: spans at
        most ``gap`` (``MERGE_GAP``) bytes apart share a request (``merge_spans``), and the requests
        run concurrently, at most ``workers`` (``WORKERS``) in flight. A failing request (retried as
        ``get``'s; its error names the file and the range) raises once the requests in flight are
        done; those not sent yet never are."""
        blocks = merge_spans(spans, MERGE_GAP if gap is None else gap)
        workers = WORKERS if workers is None else workers
        if len(blocks) <= 1 or workers <= 1:
            return [(a, self.get(file, a, b - a)) for a, b in blocks]
        pool = ThreadPoolExecutor(max_workers=min(workers, len(blocks)), thread_name_prefix="hub-range")
        try:
            futures = [pool.submit(self.get, file, a, b - a) for a, b in blocks]
            return [(a, f.result()) for (a, _), f in zip(blocks, futures, strict=True)]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def header(self, file: str) -> tuple[dict, int]:
        """(safetensors header, offset of its data) from two range reads."""
        (n,) = struct.unpack("<Q", self.get(file, 0, 8))
        try:
            header = json.loads(self.get(file, 8, n))
        except ValueError as exc:
            msg = (
                f"{self.repo_id}: {file}: not a valid safetensors header ({exc}); report it to the repo owner"
            )
            raise CorruptFileError(msg) from None
        return header, 8 + n
