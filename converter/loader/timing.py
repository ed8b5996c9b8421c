"""Opt-in breakdown of a load's time by phase: ``QM_LOAD_TIMING=1``.

``load_quantized`` then prints one line to stderr when it returns, ``qm-load-timing {json}``: the wall
seconds of each phase on the caller's thread (``open``, ``reserve``, ``alloc``, ``stream``, ``read_wait``
(waiting for the readers), ``skeleton``, ``verify_wait`` ...), the seconds summed over the stream's
reader threads (``staging_cpu`` pinning, ``read_cpu``, ``hash_cpu``, ``copy_issue_cpu``,
``slot_wait_cpu``: thread-seconds, more than the wall time when several threads work), the CUDA
warm-up thread's steps (``warm_*``, and ``warm_done_at``: when it ended, from the call), the primed
context's ``context_prime`` and a few counts. ``bench/bench_generate.py --load --load-breakdown``
sets the variable and prints the line of each contender's best run beside the first and second
forward's times.

Off (the default) every hook is a no-op. One load at a time is timed: the record is per process (the
reader threads add to it), so two loads running at once in one process would mix their numbers.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

ENV = "QM_LOAD_TIMING"
PREFIX = "qm-load-timing "


class LoadTimer:
    """Seconds per phase of one load, from the moment it was started."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.values: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, name: str, value: float) -> None:
        with self._lock:
            self.values[name] = self.values.get(name, 0.0) + value

    def mark(self, name: str) -> None:
        """``name`` = seconds since the load started (the last call wins)."""
        with self._lock:
            self.values[name] = time.perf_counter() - self.t0

    def line(self) -> str:
        with self._lock:
            total = time.perf_counter() - self.t0
            rounded = {k: round(v, 4) for k, v in self.values.items()}
        return PREFIX + json.dumps({"total": round(total, 4), **rounded})


_current: LoadTimer | None = None


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


@contextlib.contextmanager
def timed_load() -> Iterator[LoadTimer | None]:
    """The record of one load while the block runs (None when timing is off); its line is printed to
    stderr on leaving, also when the load failed. A nested call (a load inside a load) joins the outer one."""
    global _current
    if not enabled() or _current is not None:
        yield _current
        return
    _current = timer = LoadTimer()
    try:
        yield timer
    finally:
        _current = None
        print(timer.line(), file=sys.stderr, flush=True)


F = TypeVar("F", bound=Callable[..., Any])


def timed(fn: F) -> F:
    """``fn`` run inside :func:`timed_load` (a loader entry point)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with timed_load():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Add the block's wall time to ``name`` (nothing when no load is timed)."""
    timer = _current
    if timer is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        timer.add(name, time.perf_counter() - start)


def add(name: str, value: float) -> None:
    """Add ``value`` (seconds or a count) to ``name`` (nothing when no load is timed)."""
    timer = _current
    if timer is not None:
        timer.add(name, value)


def mark(name: str) -> None:
    """``name`` = seconds since the timed load started (nothing when no load is timed)."""
    timer = _current
    if timer is not None:
        timer.mark(name)


def active() -> bool:
    """Whether a load is being timed (to skip collecting numbers nobody reads)."""
    return _current is not None


def parse(text: str) -> dict[str, float] | None:
    """The last ``qm-load-timing`` record in ``text`` (a subprocess's stderr), or None."""
    found = None
    for line in text.splitlines():
        if line.startswith(PREFIX):
            found = json.loads(line[len(PREFIX) :])
    return found
