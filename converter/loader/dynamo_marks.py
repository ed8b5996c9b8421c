"""Dynamo's marks on a function or a tensor, set without importing ``torch._dynamo``.

``torch.compiler.assume_constant_result`` and ``torch._dynamo.mark_static_address`` each only set an
attribute that dynamo reads when it traces (torch/_dynamo/decorators.py), but calling them imports
``torch._dynamo``: about 1 s of a process's imports on a 2-core VM, paid at import of our int8 ops and
at the first CUDA forward even by a process that never compiles. Where dynamo is already imported these
call torch's own functions; otherwise they set the same attributes, which
tests/loader/test_dynamo_marks.py checks against torch's functions.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def assume_constant_result(fn: F) -> F:
    """``torch.compiler.assume_constant_result(fn)``: dynamo takes ``fn()``'s result as a constant."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


def mark_static_address(t: torch.Tensor) -> None:
    """``torch._dynamo.mark_static_address(t)`` (unguarded): CUDA graphs keep ``t`` where it is."""
    if "torch._dynamo" in sys.modules:
        torch._dynamo.mark_static_address(t)
        return
    t._dynamo_static_input_type = "unguarded"  # type: ignore[attr-defined]
