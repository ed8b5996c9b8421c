"""The error table, unit-tested without running the CLI."""

from __future__ import annotations

import errno
import json
import resource
import subprocess
import sys
from pathlib import Path

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
        2,  # a corrupt input (docs/cli.md's exit codes); verify turns it into its own exit 1
    )


def test_a_newer_format_version_is_not_called_invalid(tmp_path: Path) -> None:
    """An index of a newer format version said "upgrade quantize-model" and then "not a valid shard,
    reconvert it"; the file is valid and the index is not a shard."""
    from formats.index import read_index
    from formats.validate import UnknownFormatVersion

    index = {
        "metadata": {"quantize_model": {"format": {"name": "quantize-model", "version": 99}, "shards": {}}},
        "weight_map": {},
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        read_index(tmp_path)
    except UnknownFormatVersion as exc:
        message, code = describe_error(exc)
    assert message.endswith(
        "format version 99 is not supported (this reader knows 1 and 2); upgrade quantize-model"
    )
    assert code == 2  # as load_quantized and dequantize give it: change the tool, then rerun


def test_interrupt() -> None:
    assert describe_error(KeyboardInterrupt()) == ("interrupted; rerun the same command to resume", 130)


def test_unknown_error_points_to_debug() -> None:
    assert describe_error(ZeroDivisionError("division by zero")) == (
        "unexpected ZeroDivisionError: division by zero; set QUANTIZE_MODEL_DEBUG=1 for the traceback",
        1,
    )


def _convert_cli(src: Path, out: Path, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    """`quantize-model convert SRC OUT` in a child process, with RLIMIT_FSIZE (``ulimit -f``) lowered to
    ``file_size_limit`` bytes when given (Python ignores SIGXFSZ, so writes past it fail with EFBIG)."""
    command = [sys.executable, "-c", "from converter.cli import main; main()", "convert", str(src), str(out)]

    def limit_file_size() -> None:
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, hard))

    limit = limit_file_size if file_size_limit is not None else None
    return subprocess.run(command, capture_output=True, text=True, timeout=300, preexec_fn=limit)


def test_file_size_limit_names_the_shard_and_leaves_no_temp(tiny_llama: Path, tmp_path: Path) -> None:
    """A write refused by the OS (here EFBIG from a 64 KiB ``ulimit -f``, as ENOSPC from a full disk)
    names the shard being written, removes its temp file, and the same command resumes to completion."""
    out = tmp_path / "out"
    r = _convert_cli(tiny_llama, out, file_size_limit=64 << 10)
    assert r.returncode == 1, r.stderr
    assert f"Error: {out / 'model.safetensors'}: file too large" in r.stderr
    assert "ulimit -f" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == [".quantize-model-manifest.json"]
    r = _convert_cli(tiny_llama, out)
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").is_file()


def test_a_failed_extra_file_copy_names_the_output_file_and_leaves_no_temp(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """shutil's error named the source's tokenizer.json and the partial copy stayed in the output."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_llama, src)
    (src / "tokenizer.json").write_text("x" * (2 << 20))
    out = tmp_path / "out"
    r = _convert_cli(src, out, file_size_limit=1 << 20)
    assert r.returncode == 1, r.stderr
    assert f"Error: {out / 'tokenizer.json'}: file too large" in r.stderr
    assert not [p.name for p in out.iterdir() if "tokenizer" in p.name]


def test_full_disk_from_a_file_descriptor_names_the_file(tmp_path: Path) -> None:
    """pwrite/fsync raise ENOSPC without a file name; the writer adds it, so the message has it."""
    from formats.writer import naming_os_errors

    target = tmp_path / "model-00001-of-00002.safetensors"
    try:
        with naming_os_errors(target):
            raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as exc:
        message, code = describe_error(exc)
    assert code == 1
    assert message.startswith(f"{target}: no space left on device; free disk space")


def test_a_usage_error_with_json_prints_the_error_object(qm, tiny_llama: Path, tmp_path: Path) -> None:
    """docs/cli.md: with --json, stdout gets {"ok": false, ...} for every error; a bad option value
    (click's usage error, raised before the command knows --json) printed nothing on stdout."""
    r = qm("convert", tiny_llama, tmp_path / "o", "--blocksize", "48", "--json")
    assert r.exit_code == 2
    error = json.loads(r.stdout)
    assert error["ok"] is False
    assert error["exit_code"] == 2
    assert error["error"].startswith("Invalid value for '--blocksize': '48'")
    r = qm("convert", tiny_llama, tmp_path / "o", "--blocksize", "48")
    assert r.exit_code == 2
    assert r.stdout == ""


def test_ctrl_c_while_the_cli_imports_is_one_line_and_130(tmp_path: Path) -> None:
    """SIGINT during the CLI's imports (the first second or two on a loaded machine) printed a long
    traceback from inside an import and died by the signal. The console script (pyproject.toml's
    entry point) now ends it as any other Ctrl-C. The signal is sent when converter.cli imports its
    convert command, from an import hook: deterministic, unlike a kill timed from outside."""
    from converter.tools.plan_file import tomllib  # tomli before Python 3.11

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    module, _, function = pyproject["project"]["scripts"]["quantize-model"].partition(":")
    driver = f"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # background jobs start with SIGINT ignored

class InterruptOnImport:
    def find_spec(self, name, path=None, target=None):
        if name == "converter.cli.convert":
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, InterruptOnImport())
from {module} import {function}
{function}()
"""
    command = [sys.executable, "-c", driver, "convert", str(tmp_path / "src"), str(tmp_path / "out")]
    r = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert (r.returncode, r.stdout, r.stderr) == (
        130,
        "",
        "Error: interrupted; rerun the same command to resume\n",
    )


def test_a_usage_error_with_batch_json_file_keeps_stdout_plain(qm, tiny_llama: Path, tmp_path: Path) -> None:
    """`batch PLAN --json report.json` asks for the report in a file; a usage error still printed the
    JSON error object on stdout (where the table goes). Without FILE it is printed, as for convert."""
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tiny_llama}\n")
    r = qm("batch", listing, tmp_path / "outs", "--json", tmp_path / "report.json", "--jobs", "0")
    assert r.exit_code == 2
    assert r.stdout == ""
    r = qm("batch", listing, tmp_path / "outs", "--json", "--jobs", "0")
    assert r.exit_code == 2
    assert json.loads(r.stdout)["error"].startswith("Invalid value for '--jobs'")
