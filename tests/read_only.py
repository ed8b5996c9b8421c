"""A folder that reads as on a read-only filesystem to the preflight (``os.statvfs``'s ``ST_RDONLY``, as
``mount -o ro`` sets it), without mounting anything."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest


def mark_read_only(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """``converter.plan.preflight``'s ``os.statvfs(folder)`` says read-only; other paths are the real ones."""
    import converter.plan.preflight

    real = os.statvfs
    st = real(folder)
    read_only = SimpleNamespace(**{k: getattr(st, k) for k in dir(st) if k.startswith("f_")})
    read_only.f_flag |= os.ST_RDONLY
    monkeypatch.setattr(
        converter.plan.preflight.os, "statvfs", lambda p: read_only if Path(p) == folder else real(p)
    )
