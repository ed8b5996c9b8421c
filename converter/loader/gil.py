"""A shorter GIL switch interval while a CUDA load's threads run beside its Python.

A CUDA load runs several threads beside the caller: the readers (``loader/stream.py``), the warm-up
(``loader/warmup.py``) and, with verify, the hashing threads. Each releases the GIL for its reads,
hashes and CUDA calls and takes it back for a few microseconds of Python in between. While the caller
runs Python (parsing the headers, building the skeleton), each such take-back waits until the caller
is made to drop the GIL, which CPython does only after the switch interval (``sys.setswitchinterval``,
5 ms by default): measured on the development VM, 100 GIL releases of a side thread took 238 ms beside a
Python loop at 5 ms, 85 ms at 0.5 ms (bench note in docs/benchmarks.md, "Load (loadfast2)"). The
interval is lowered for the load only and put back after it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

#: Seconds. Each forced switch costs the caller a few microseconds; at this interval that is ~1%.
LOAD_SWITCH_INTERVAL = 0.0005


@contextlib.contextmanager
def short_switch_interval(seconds: float = LOAD_SWITCH_INTERVAL) -> Iterator[None]:
    """``sys.setswitchinterval(seconds)`` while the block runs (never raised: a shorter one set by the
    caller stays); the previous value is restored unless someone changed it meanwhile."""
    before = sys.getswitchinterval()
    if seconds >= before:
        yield
        return
    sys.setswitchinterval(seconds)
    ours = sys.getswitchinterval()  # as CPython rounds it
    try:
        yield
    finally:
        if sys.getswitchinterval() == ours:
            sys.setswitchinterval(before)
