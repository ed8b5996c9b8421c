"""The error table, unit-tested without running the CLI."""

from __future__ import annotations

import errno

from converter.cli._app import describe_error
from converter.errors import ConversionFailedError, OutputExistsError
from formats.validate import TruncatedFile


def test_converter_errors_keep_their_message_and_code() -> None:
    assert describe_error(OutputExistsError("out: holds x; pass --overwrite")) == (
        "out: holds x; pass --overwrite",
        2,
    )
    assert describe_error(ConversionFailedError("out/m.safetensors: writing failed")) == (
        "out/m.safetensors: writing failed",
        1,
    )


def test_disk_full() -> None:
    exc = OSError(errno.ENOSPC, "No space left on device", "/data/out/model.safetensors")
    assert describe_error(exc) == (
        "/data/out/model.safetensors: no space left on device; "
        "free disk space, then rerun the same command to resume",
        1,
    )


def test_format_error() -> None:
    msg, code = describe_error(TruncatedFile("x.safetensors: file ends at byte 3"))
    assert (msg, code) == (
        "x.safetensors: file ends at byte 3; the file is not a valid quantize-model shard, reconvert it",
        1,
    )


def test_interrupt() -> None:
    assert describe_error(KeyboardInterrupt()) == ("interrupted; rerun the same command to resume", 130)


def test_unknown_error_points_to_debug() -> None:
    assert describe_error(ZeroDivisionError("division by zero")) == (
        "unexpected ZeroDivisionError: division by zero; set QUANTIZE_MODEL_DEBUG=1 for the traceback",
        1,
    )
