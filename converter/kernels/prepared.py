"""Prepared 4-bit weights by key: what the keyed custom ops (``gemv_4bit_keyed``,
``gemv_4bit_multi_keyed``) read besides x and the layer's weight, and what ``moe_experts_4bit_keyed``
reads besides the routed tokens and an experts layer's codes (its absmax and code table:
``converter.loader.moe.PreparedExperts``).

Why: before every call of a ``torch.compile``'d step dynamo checks a guard per tensor the graph reads
from the model, and every 4-bit layer's kernel takes five small tensors besides its codes (absmax or
the nested record, the code tables). At 48 small MoE layers those were 816 more graph inputs and ~770
more tensor guards than the bf16 model's, about 0.5 ms of host time per compiled call
(docs/benchmarks.md, round 34). A layer registers its prepared arguments here once
(:func:`register`), and a compiled graph calls the keyed op with x, the layer's weight (its one graph
input, as a bf16 linear's) and the key: an integer constant of the graph, guarded like the layer's
other plain attributes.

Why that is safe: the registered tensors are made once from the weight (``ops.prepare``) and never
written; a layer that prepares again (a new weight, a device move) registers anew under a new key, which
changes the attribute the graph was traced from, so dynamo recompiles (one recompile per call after
such changes: dynamo's recompile_limit bounds them, docs/python-api.md); a copied or unpickled layer
registers its own copy (``QuantLinear4bit.__setstate__``); the entry goes when its layer is collected.
An experts layer registers its own buffers (no copies, never written) and registers anew whenever one
is assigned, loaded or moved (``QuantExperts4bit._prepare``).
Their addresses are fixed while registered, so a CUDA graph that recorded a launch stays valid while
they are. Once they are released (the layer prepared again or collected) such a graph would read freed
memory. A layer that drops them (prepared again, a weight assigned in place of its own) calls
:func:`retire`, which changes :func:`epoch`, and ``graphed_greedy`` records its graphs again when the
epoch changed since they were recorded. A collected layer does not: it left its model, and graphs of a
model whose modules were replaced are the caller's to drop, as for any module.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import Any

_ARGS: dict[int, Any] = {}
#: The finalizer that releases each key with its layer (detached when the key is released first, so a
#: layer prepared again and again holds one, not one per preparation).
_FINALIZERS: dict[int, weakref.finalize] = {}
_KEYS = itertools.count()
_epoch = 0  # see epoch()
_LOCK = threading.Lock()  # layers are prepared on the loader's threads


def register(owner: object, args: Any) -> Any:
    """``args`` (a NamedTuple with a ``key`` field: ``ops.KernelArgs``, ``moe.PreparedExperts``) with a
    new ``key``, under which they are registered while ``owner`` lives or until :func:`release`."""
    with _LOCK:
        keyed = args._replace(key=next(_KEYS))
        _ARGS[keyed.key] = keyed
        _FINALIZERS[keyed.key] = weakref.finalize(owner, release, keyed.key)
    return keyed


def release(key: int) -> None:
    # no lock: a collection inside register's may run a layer's finalizer on this thread
    _ARGS.pop(key, None)
    finalizer = _FINALIZERS.pop(key, None)
    if finalizer is not None:
        finalizer.detach()  # a no-op when it is the finalizer calling


def retire() -> None:
    """Count kernel tensors a live layer dropped (its prepared arguments, registered or not, or its
    weight): a CUDA graph recorded before may hold their addresses."""
    global _epoch
    with _LOCK:
        _epoch += 1


def epoch() -> int:
    """Changes whenever a live layer dropped kernel tensors (:func:`retire`): graphs recorded at another
    epoch may read freed memory and must be recorded again."""
    return _epoch


def lookup(key: int) -> Any:
    """The arguments registered under ``key``; a clear error for a key whose layer is gone."""
    try:
        return _ARGS[key]
    except KeyError:
        msg = (
            f"no prepared 4-bit weight under key {key}: its layer was freed or prepared again after this "
            "graph was compiled (call torch._dynamo.reset() and compile again)"
        )
        raise RuntimeError(msg) from None
