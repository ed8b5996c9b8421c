"""Ctrl-C and SIGTERM for ``quantize-model batch``, from the first instant of the process.

A batch stopped by Ctrl-C or SIGTERM (a CI job cancelled or timed out) still writes its reports. Until
it knows its jobs (the CLI still importing, the plan being read: a fraction of a second, about a
second on a loaded machine) there is no report to write, so a signal is only recorded then
(``install``): the batch reports every job as not started when it gets there (``start_raising``
returns the signal). From then on a signal raises ``KeyboardInterrupt`` carrying its number as
``signum``, as Ctrl-C does. ``restore`` puts the previous handlers back.

No import here beyond the standard library: ``converter.__main__`` installs it before importing the CLI.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_previous: dict[int, Any] = {}
_pending: int | None = None
_raising = False


def interrupt(signum: int) -> KeyboardInterrupt:
    """The ``KeyboardInterrupt`` a signal stops a command with, carrying its number as ``signum`` (the CLI
    says which signal, and exits 128 + signum: 130 for Ctrl-C, 143 for SIGTERM)."""
    exc = KeyboardInterrupt(signal.Signals(signum).name)
    exc.signum = signum  # type: ignore[attr-defined]
    return exc


def _handler(signum: int, frame: Any) -> None:
    global _pending
    if _raising:
        raise interrupt(signum)
    if _pending is None:
        _pending = signum


def is_batch(argv: list[str]) -> bool:
    """Whether the command line ``argv`` (without the program) runs ``batch``."""
    command = next((a for a in argv if not a.startswith("-")), None)
    return command == "batch"


def install() -> None:
    """From now on record SIGINT and SIGTERM instead of acting on them (main thread only; a signal
    ignored by whoever started the process, as SIGINT for a background job, stays ignored)."""
    global _pending, _raising
    if _previous or threading.current_thread() is not threading.main_thread():
        return
    _pending, _raising = None, False
    for s in _SIGNALS:
        if signal.getsignal(s) is not signal.SIG_IGN:
            _previous[s] = signal.signal(s, _handler)


def start_raising() -> int | None:
    """From now on a signal raises KeyboardInterrupt; returns the signal recorded before, if any."""
    global _raising
    _raising = True
    return _pending


def restore() -> int | None:
    """Put the previous handlers back; returns the signal recorded and not yet acted on, if any."""
    global _raising
    pending = None if _raising else _pending
    for s, handler in _previous.items():
        signal.signal(s, handler)
    _previous.clear()
    _raising = False
    return pending
