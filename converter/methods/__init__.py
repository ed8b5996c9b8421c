"""Quantization methods as plug-ins: one registry, one module per method.

``get_method("int8")`` returns the :class:`~converter.methods.base.QuantMethod` that the pipeline,
plan, CLI and loader ask for everything method-specific (kernels, record and metadata, config,
runtime module). Adding a method = a module here implementing ``QuantMethod``, registered below,
plus its kernels / record / runtime layer in their own modules; nothing else tests the quant type.
"""

from __future__ import annotations

from converter.methods.base import QuantMethod
from converter.methods.bnb4bit import Bnb4bitMethod
from converter.methods.int8 import Int8Method

__all__ = ["QuantMethod", "for_config", "for_record", "get_method", "method_names", "register"]

_REGISTRY: dict[str, QuantMethod] = {}


def register(method: QuantMethod) -> QuantMethod:
    """Add a method under its name (a second one of the same name is a programming error)."""
    if method.name in _REGISTRY:
        msg = f"quant method {method.name!r} is registered twice"
        raise ValueError(msg)
    _REGISTRY[method.name] = method
    return method


def method_names() -> tuple[str, ...]:
    """The ``--quant-type`` values, in registration order."""
    return tuple(_REGISTRY)


def get_method(name: str) -> QuantMethod:
    """The method named ``name`` (case-insensitive); ValueError listing the known names otherwise."""
    method = _REGISTRY.get(str(name).lower())
    if method is None:
        known = ", ".join(repr(n) for n in _REGISTRY)
        msg = f"unknown quant type {name!r}: expected one of {known}"
        raise ValueError(msg)
    return method


def for_record(record: object) -> QuantMethod:
    """The method that reads a record (``formats`` record class) back."""
    for method in _REGISTRY.values():
        if method.reads(record):
            return method
    msg = f"no quant method reads a {type(record).__name__}"
    raise TypeError(msg)


def for_config(qconfig: dict) -> QuantMethod | None:
    """The method a ``quantization_config`` describes (None for one no method claims)."""
    return next((m for m in _REGISTRY.values() if m.matches_config(qconfig)), None)


def own_options() -> tuple[str, ...]:
    """Every Options field some method owns (dropped from the JSON of the others)."""
    return tuple(k for m in _REGISTRY.values() for k in m.own_options)


def foreign_options(quant_type: str) -> list[str]:
    """The Options fields other methods own and ``quant_type``'s does not read (``int8_threshold`` for
    nf4, ``double_quant`` for int8), once each (nf4 and fp4 share theirs)."""
    mine = get_method(quant_type).own_options
    return [k for k in dict.fromkeys(own_options()) if k not in mine]


register(Bnb4bitMethod("nf4", "4-bit NormalFloat (NF4), blockwise absmax (bitsandbytes Linear4bit)"))
register(Bnb4bitMethod("fp4", "4-bit float (FP4), blockwise absmax (bitsandbytes Linear4bit)"))
register(Int8Method())
