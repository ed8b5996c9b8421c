"""``QM_CPU_ISA``, checked up front: a bad value is the user's input error, named before any output.

The kernels read it on every call (so a test harness may set it after import) and would fail only at
their first call: after a conversion created its output folder, or at a loaded model's first forward.
"""

from __future__ import annotations

import os

from converter.errors import InputError

ENV = "QM_CPU_ISA"
_PATHS = ("scalar", "avx2", "avx512", "avx512bf16")


def forced_isa() -> str | None:
    """The CPU kernel path ``QM_CPU_ISA`` forces (None: the best this CPU runs); ``InputError`` when the
    value is unknown or this CPU lacks the path."""
    forced = os.environ.get(ENV, "")
    if forced in ("", "auto"):
        return None
    try:
        from converter import _kernels
    except ImportError:  # no built extension: nothing reads the variable
        return None
    runs = list(_kernels.cpu_isas())
    if forced not in _PATHS:
        msg = f"{ENV}={forced!r}: unknown kernel path; use one of {', '.join(_PATHS)} or auto, or unset it"
        raise InputError(msg)
    if forced not in runs:
        msg = f"{ENV}={forced}: this CPU does not run that path; use one of {', '.join(runs)}, or unset it"
        raise InputError(msg)
    return forced


def running_isa() -> str | None:
    """The CPU kernel path ``isa="auto"`` runs now: the one ``QM_CPU_ISA`` forces, else the best this CPU
    runs (None without the built extension)."""
    forced = forced_isa()
    if forced is not None:
        return forced
    try:
        from converter import _kernels
    except ImportError:
        return None
    return list(_kernels.cpu_isas())[-1]
