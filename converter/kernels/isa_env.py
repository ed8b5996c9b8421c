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


def bf16_matmul_is_native() -> bool:
    """Whether torch's bfloat16 matmuls on the CPU run native bf16 dot products (AVX512_BF16 / AMX).

    Without them torch widens in its GEMM and runs 4-7x slower than the float32 GEMM on the same values
    (64 x 576 @ 576 x 1536: 3.7 ms with AVX-512, 7.4 ms with AVX2, against 1.0 ms in float32), so the
    4-bit layers' prefill multiplies in float32 there. A path below ``avx512bf16`` forced by
    ``QM_CPU_ISA`` counts as such a CPU (how the tests run that route on any host)."""
    return running_isa() == "avx512bf16"
