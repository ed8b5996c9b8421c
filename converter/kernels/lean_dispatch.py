"""A lean dispatcher route for this project's custom ops on CPU tensors (compiled CPU decode).

``torch.library.custom_op`` puts a Python kernel on the ``Autograd`` key of every op: for each call it
checks whether a gradient is needed and, when not, redispatches below autograd from Python to the
device kernel (itself wrapped in a Python aliasing check). Compiled code calls the ops through the
dispatcher, so a CPU decode step paid those layers on each of its ~200 GEMV calls: 17.6 µs per call of
a tiny weight against 7.4 µs for a kernel reached straight from the dispatcher (2-core dev VM,
docs/benchmarks.md "CPU compiled decode (cpucompile)").

:func:`register_lean_cpu` adds, on the more specific ``AutogradCPU`` key only, a kernel that calls the
op's CPU implementation directly when the call is the plain case: no tensor argument that requires
grad under grad mode, and no dispatch key below autograd but ``CPU`` (so no fake or functional tensor
while tracing, no tensor subclass, no ``TorchDispatchMode``). Every other call goes to the kernel
``custom_op`` itself registers (the same object, built the same way), so tracing, opcheck, the
"no autograd formula" error on backward and every device other than the CPU behave as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

#: The keys a call on plain CPU tensors reaches the AutogradCPU kernel with.
_PLAIN_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU) | torch._C.DispatchKeySet(
    torch._C.DispatchKey.AutogradCPU
)

_libraries: dict[str, torch.library.Library] = {}  # namespace -> fragment holding the registrations


def _general_autograd_kernel(op: Any) -> Callable | None:
    """custom_op's own Autograd kernel for ``op`` (a ``CustomOpDef``), or None if this torch lacks it."""
    try:
        from torch._library.autograd import make_autograd_impl
    except ImportError:  # a torch without this (private) helper: keep custom_op's dispatch as it is
        return None
    return make_autograd_impl(op._opoverload, op)


def register_lean_cpu(op: Any, cpu: Callable) -> bool:
    """Route plain CPU calls of the custom op ``op`` straight to ``cpu`` (its CPU implementation).

    Returns whether the lean kernel was registered (False: this torch has no ``make_autograd_impl``,
    custom_op's dispatch is left unchanged).
    """
    general = _general_autograd_kernel(op)
    if general is None:
        return False
    any_requires_grad = torch._C._any_requires_grad
    grad_enabled = torch.is_grad_enabled
    plain = _PLAIN_CPU

    def kernel(keyset: torch._C.DispatchKeySet, *args: Any) -> Any:
        if keyset == plain and not (grad_enabled() and any_requires_grad(*args)):
            return cpu(*args)
        return general(keyset, *args)

    namespace, name = op._qualname.split("::")
    lib = _libraries.get(namespace)
    if lib is None:
        lib = _libraries[namespace] = torch.library.Library(namespace, "FRAGMENT")
    lib.impl(name, kernel, "AutogradCPU", with_keyset=True)
    return True
