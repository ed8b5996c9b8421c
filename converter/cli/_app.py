"""All CLI output goes through one App object: one rich Console per stream, one error table.

Consoles are built with markup, highlighting and emoji off, so paths and tensor names supplied by
users are printed as they are. Messages, warnings and errors go to stderr; stdout carries only the
result (a summary table, or JSON with --json). ``QUANTIZE_MODEL_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import errno
import importlib.abc
import importlib.machinery
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table

from converter.batch_signals import interrupt
from converter.errors import ConverterError

DEBUG_ENV = "QUANTIZE_MODEL_DEBUG"
DEBUG_HINT = f"set {DEBUG_ENV}=1 for the traceback"


def _format_os_error(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{where}no space left on device; free disk space, then rerun the same command to resume"
    if exc.errno == errno.EFBIG:
        return (
            f"{where}file too large for the file system or the process's file size limit (ulimit -f); "
            "raise the limit or write elsewhere, then rerun the same command to resume"
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{where}permission denied; choose a folder you can write to"
    return f"{where}{exc.strerror or exc}; check the path and rerun"


def _format_format_error(exc: Exception) -> str:
    from formats.index import INDEX_REMEDY
    from formats.validate import BadIndex, MissingShard, TwoLayouts, UnknownFormatVersion

    if isinstance(exc, (UnknownFormatVersion, TwoLayouts)):  # valid files; the message says what to do
        return str(exc)
    if isinstance(exc, MissingShard):  # no file to call invalid; the message says what to do
        return str(exc)
    if isinstance(exc, BadIndex):  # the index, not a shard
        return f"{exc}; {INDEX_REMEDY}"
    return f"{exc}; the file is not a valid quantize-model shard, reconvert it"


def _error_table() -> list[tuple[type[BaseException], Callable[[Any], str], int | None]]:
    """Exception type -> (one-line message, exit code; None = the exception's own exit_code).

    Order matters: the first matching type wins, so subclasses come before their bases.
    """
    from formats.validate import FormatError

    return [
        (ConverterError, str, None),  # our own messages are already one line ending in what to do
        (FormatError, _format_format_error, 2),  # a damaged input file (verify: a problem, exit 1)
        (KeyboardInterrupt, _format_interrupt, None),  # 130 for Ctrl-C, 143 for SIGTERM (its signum)
        (OSError, _format_os_error, 1),
    ]


def _format_interrupt(exc: BaseException) -> str:
    signum = getattr(exc, "signum", None)
    if signum == signal.SIGTERM:
        return "interrupted by SIGTERM; rerun the same command to resume"
    return "interrupted; rerun the same command to resume"


def _interrupt_code(exc: BaseException) -> int:
    return 128 + int(getattr(exc, "signum", signal.SIGINT))


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (what a CI runner sends a cancelled or timed-out job) stops the command as Ctrl-C does:
    the work unwinds as for an interrupt (partial files removed, finished shards kept), one error line
    and, with --json, the error object on stdout, exit 143. Without it the process died at once with
    exit 143 and printed nothing, so a script reading ``--json`` got an empty stdout."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise interrupt(signum)

    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN:  # ignored by whoever started the process: stays ignored
        yield
        return
    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def describe_error(exc: BaseException) -> tuple[str, int]:
    """The one-line message and exit code for ``exc`` (unknown errors: exit 1 and the debug hint)."""
    for kind, fmt, code in _error_table():
        if isinstance(exc, kind):
            message = fmt(exc)
            if isinstance(exc, KeyboardInterrupt):
                return message, _interrupt_code(exc)
            return message, code if code is not None else getattr(exc, "exit_code", 1)
    return f"unexpected {type(exc).__name__}: {exc}; {DEBUG_HINT}", 1


#: The huggingface_hub module every one of its progress bars comes from.
_HUB_TQDM = "huggingface_hub.utils.tqdm"


class _OnFirstImport(importlib.abc.MetaPathFinder):
    """Calls ``then(module)`` right after the first import of module ``name`` has run, whoever imports
    it; then steps aside (the import itself is the one the path finders would have done)."""

    def __init__(self, name: str, then: Callable[[Any], None]) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module, then = loader.exec_module, self.then

        def exec_then(module: Any) -> None:
            exec_module(module)
            then(module)

        loader.exec_module = exec_then  # this spec's own loader instance
        return spec


def _hub_progress_bars_off() -> None:
    """huggingface_hub's own tqdm bars (push's upload, a Hub snapshot's download) follow the App's
    rule too; a user's explicit HF_HUB_DISABLE_PROGRESS_BARS keeps priority, as huggingface_hub gives it.

    Turned off when huggingface_hub's progress module is first imported, not by importing it here:
    huggingface_hub.utils (tqdm, asyncio, ssl...) is about 0.15 s, which inspect, verify and a local
    conversion with --json / -q / into a pipe paid without ever reaching the Hub."""
    if "HF_HUB_DISABLE_PROGRESS_BARS" in os.environ:
        return
    if _HUB_TQDM in sys.modules:
        sys.modules[_HUB_TQDM].disable_progress_bars()
    elif not any(isinstance(f, _OnFirstImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _OnFirstImport(_HUB_TQDM, lambda module: module.disable_progress_bars()))


class App:
    """What every command receives through ``@click.pass_obj``."""

    def __init__(self) -> None:
        self.out = Console(markup=False, highlight=False, emoji=False, soft_wrap=True)
        self.err = Console(stderr=True, markup=False, highlight=False, emoji=False, soft_wrap=True)
        self.json = False
        self.quiet = False

    def configure(self, *, json: bool = False, quiet: bool = False) -> None:
        self.json, self.quiet = json, quiet
        if not self.show_progress:
            _hub_progress_bars_off()

    @property
    def debug(self) -> bool:
        return os.environ.get(DEBUG_ENV, "") not in ("", "0")

    @property
    def show_progress(self) -> bool:
        """A progress bar only for a person watching: not with --json / --quiet, not into a pipe."""
        return not (self.json or self.quiet) and self.err.is_terminal

    # --- output ----------------------------------------------------------------------------
    def info(self, text: str) -> None:
        if not self.quiet:
            self.err.print(text)

    def warn(self, text: str) -> None:
        self.err.print(f"Warning: {text}")

    def error(self, text: str) -> None:
        self.err.print(f"Error: {text}")

    def print_json(self, obj: Any) -> None:
        # click.echo, not rich: JSON must never be wrapped or styled.
        click.echo(json.dumps(obj, indent=2, default=str))

    def print_table(self, table: Table) -> None:
        if not self.quiet:
            # As wide as the content needs: a path is never cut to fit an 80-column pipe.
            wide = self.out.options.update_width(10_000)
            needed = self.out.measure(table, options=wide).maximum
            if needed > self.out.width:
                self.out.width = needed
            self.out.print(table)

    def abort(self, text: str, code: int = 1) -> NoReturn:
        """Print one error line (and, with --json, an error object on stdout), then exit with ``code``."""
        self.error(text)
        if self.json:
            self.print_json({"ok": False, "error": text, "exit_code": code})
        raise click.exceptions.Exit(code)

    def fail_with(self, exc: BaseException) -> NoReturn:
        """Turn an exception into its one-line message and exit code (the error table)."""
        message, code = describe_error(exc)
        if self.debug:
            self.err.print_exception(suppress=[click], show_locals=False)
        self.abort(message, code)


def table(title: str | None = None) -> Table:
    t = Table(title=title, show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold", no_wrap=True)
    # Values (paths, tensor names) are never cut or folded, whatever the terminal width.
    t.add_column(no_wrap=True, overflow="ignore")
    return t


def not_empty(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A path argument as given, refused when it is the empty string (an unset shell variable: ``convert
    "$SRC" out``), which Path("") and click.Path take as the current folder."""
    if value == "":
        msg = "empty; give a path ('.' for the current folder)"
        raise click.BadParameter(msg, ctx, param)
    return value


def not_empty_path(ctx: click.Context, param: click.Parameter, value: str | None) -> Path | None:
    """:func:`not_empty`, as a Path."""
    value = not_empty(ctx, param, value)
    return None if value is None else Path(value)
