"""bitsandbytes as our layers' base classes, taken when the process imports it; imported by us only
for a process that imports PEFT.

Our 4-bit and 8-bit layers are also ``bnb.nn.Linear4bit`` / ``bnb.nn.Linear8bitLt`` instances where
bitsandbytes is imported, so that a plain ``peft.get_peft_model`` wraps them with PEFT's own LoRA layers
(PEFT dispatches on those types). Importing it in the loader would cost every loading process more than a
second (it imports ``torch._dynamo`` and inductor; a whole process loading SmolLM2 on a 2-core VM,
bench/bench_load_process.py: 5.2 s with it, 4.0 s without), and nothing in loading or running a model
needs it. So:

- where bitsandbytes is already imported (PEFT, the user's script, transformers' bnb loader), the layers
  take its classes as bases from the start;
- otherwise they are our own classes (as on an install without bitsandbytes), and :func:`when_imported`
  runs the layer modules' upgrade right after bitsandbytes' import completes, whoever imports it: the
  layers built so far become the bnb-based classes in place (same objects, same tensors), so
  ``import peft`` after ``load_quantized`` still gives PEFT layers it recognizes; any plain layer built
  after that is upgraded at once.

PEFT up to 0.21 imported bitsandbytes in ``import peft``; 0.22 imports it only when it dispatches a
layer, after its transformers-5 target conversion has judged the layers by type (an ``nn.Linear`` target
stays a module target, anything else is taken for the fused MoE experts' parameters). So a process that
imports PEFT imports bitsandbytes too, where it is installed: right after ``import peft``, or when our
layers are first defined if PEFT came first. PEFT then sees the same bnb layers whatever its version.

The hook is a ``sys.meta_path`` finder that answers nothing itself: for ``bitsandbytes`` and ``peft``
alone it asks the finders after it and wraps the found loader's ``exec_module``; it removes itself once
bitsandbytes is imported.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

# bitsandbytes' CPU backend warns at import when the optional `kernels` package (its own AVX-512-BF16
# GEMM) is missing; we never call its kernels, so that warning would only mislead our users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_NAME = "bitsandbytes"
_PEFT = "peft"
_lock = threading.Lock()
_callbacks: list[Callable[[ModuleType], None]] = []
_tried_for_peft = False


def imported() -> ModuleType | None:
    """bitsandbytes if this process has imported it (its import finished), else ``None``; never imports."""
    module = sys.modules.get(_NAME)
    if module is None or getattr(getattr(module, "__spec__", None), "_initializing", False):
        return None
    return module


def when_imported(callback: Callable[[ModuleType], None]) -> None:
    """Run ``callback(bitsandbytes)`` once bitsandbytes is imported: now if it is, else right after its
    import completes (in the importing thread). A callback that raises is reported as a warning; the
    import itself still succeeds."""
    with _lock:
        module = imported()
        if module is None:
            _callbacks.append(callback)
            if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
                sys.meta_path.insert(0, _AfterImport())
    if module is None:
        if _PEFT in sys.modules:  # PEFT 0.22+ came first, without bitsandbytes
            _import_for_peft()
        return
    _run(callback, module)


def _import_for_peft() -> None:
    """Import bitsandbytes, where it is installed, for a process that imports PEFT (module docstring);
    once: an import that failed is not retried (nor warned about again) by the next layer class."""
    global _tried_for_peft
    if _tried_for_peft or imported() is not None or importlib.util.find_spec(_NAME) is None:
        return
    _tried_for_peft = True
    try:
        importlib.import_module(_NAME)
    except Exception as exc:  # never break the user's `import peft`
        warnings.warn(
            f"quantize-model: bitsandbytes is installed but its import failed ({type(exc).__name__}: {exc}); "
            "PEFT will not recognize our layers as bnb layers (use converter.loader.lora.register_lora)",
            RuntimeWarning,
            stacklevel=2,
        )


class Adoption:
    """The layers of one plain class of ours, and the bitsandbytes-based class they take once bitsandbytes
    is imported (``make_class(bnb)`` builds it then; ``upgrade(layer)`` turns one plain layer into it in
    place). Where bitsandbytes is imported every plain layer becomes that class: one built before the
    import is kept (weakly) until it, one built after is upgraded at once; a lock with the adoption, so a
    layer built while another thread imports bitsandbytes is not missed."""

    def __init__(self, plain: type, make_class: Callable[[ModuleType], type], upgrade: Callable[[Any], None]):
        self.plain = plain
        self.bnb_class: type | None = None  # None until bitsandbytes is imported
        self._make_class, self._upgrade = make_class, upgrade
        self._waiting: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()
        when_imported(self._adopt)

    def track(self, layer: Any) -> None:
        """Called by every new (or unpickled, or copied) plain layer; its subclasses are left alone."""
        if type(layer) is not self.plain:
            return
        with self._lock:
            if self.bnb_class is None:
                self._waiting.add(layer)
                return
        self._upgrade(layer)

    def _adopt(self, bnb: ModuleType) -> None:
        bnb_class = self._make_class(bnb)
        bnb_class.__module__, bnb_class.__qualname__ = self.plain.__module__, bnb_class.__name__  # pickling
        with self._lock:
            self.bnb_class = bnb_class
            layers = list(self._waiting)
            self._waiting.clear()
        for layer in layers:
            self._upgrade(layer)


def _run(callback: Callable[[ModuleType], None], module: ModuleType) -> None:
    try:
        callback(module)
    except Exception as exc:  # never break the user's `import peft` / `import bitsandbytes`
        warnings.warn(
            f"quantize-model: our layers could not take bitsandbytes' classes after it was imported "
            f"({type(exc).__name__}: {exc}); PEFT will not recognize them as bnb layers "
            f"(use converter.loader.lora.register_lora)",
            RuntimeWarning,
            stacklevel=2,
        )


def _imported_now(module: ModuleType) -> None:
    with _lock:
        callbacks = list(_callbacks)
        _callbacks.clear()
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AfterImport)]
    for callback in callbacks:
        _run(callback, module)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader the other finders give for bitsandbytes and PEFT."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in (_NAME, _PEFT):
            return None
        spec = None
        for finder in list(sys.meta_path):
            if finder is self or isinstance(finder, _AfterImport) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_notify(module: ModuleType) -> None:
            exec_module(module)
            if fullname == _NAME:
                _imported_now(module)
            else:
                _import_for_peft()

        loader.exec_module = exec_then_notify  # this spec's loader only (a finder makes one per spec)
        return spec
