"""The tool version written into plans, shards and reports (one place; no imports of its own)."""

from __future__ import annotations


def tool_version() -> str:
    from converter import __version__

    return __version__
