"""bitsandbytes for our layers' base classes, imported only where a process can use it.

Our 4-bit and 8-bit layers subclass ``bnb.nn.Linear4bit`` / ``bnb.nn.Linear8bitLt`` so that a plain
``peft.get_peft_model`` wraps them with PEFT's own LoRA layers (PEFT dispatches on those types). That
needs bitsandbytes imported, which costs a loading process more than a second (it imports
``torch._dynamo``; a whole process loading SmolLM2 on a 2-core VM, bench/bench_load_process.py: 6.0 s
with it, 4.8 s without), and nothing else in loading or running a model needs it. So bitsandbytes is
imported only when PEFT is installed too, or when the process has already imported bitsandbytes (bnb
tooling at work); otherwise the layers are our own classes, as on an install without bitsandbytes,
and PEFT works through ``converter.loader.lora.register_lora``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from types import ModuleType

# bitsandbytes' CPU backend warns at import when the optional `kernels` package (its own AVX-512-BF16
# GEMM) is missing; we never call its kernels, so that warning would only mislead our users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken or half-installed package counts as absent
        return False


def bitsandbytes_for_layers() -> ModuleType | None:
    """bitsandbytes (imported) when our layers should take its classes as bases, else ``None``: it is
    installed, and PEFT is installed or bitsandbytes is already imported."""
    if "bitsandbytes" not in sys.modules and not (_installed("bitsandbytes") and _installed("peft")):
        return None
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError:  # pragma: no cover - an install whose bitsandbytes fails to import
        return None
