"""HTTP range reads of one Hub repo at one commit: what ``inspect`` and a header-only ``estimate`` read
instead of downloading shards (a safetensors header, a quant state, a code table)."""

from __future__ import annotations

import json
import struct

from converter.errors import CorruptFileError

__all__ = ["RangeReader"]


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

    def get(self, file: str, start: int | None = None, length: int | None = None) -> bytes:
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        url = hf_hub_url(self.repo_id, file, revision=self.commit, endpoint=self.client.endpoint)
        headers = build_hf_headers(token=self.client.token)
        if start is not None and length is not None:
            if length == 0:
                return b""
            headers["Range"] = f"bytes={start}-{start + length - 1}"

        def fetch() -> bytes:
            r = get_session().get(url, headers=headers, follow_redirects=True)
            hf_raise_for_status(r)
            if length is not None and len(r.content) != length:
                msg = f"short range read of {file} ({len(r.content)} of {length} bytes)"
                raise OSError(msg)
            return r.content

        data = self.client.call("range read", fetch, file=file)
        self.bytes_read += len(data)
        return data

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
