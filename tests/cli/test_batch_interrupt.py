"""A batch stopped by SIGTERM (a CI job cancelled or timed out) or Ctrl-C still writes its JUnit and
JSON reports: finished jobs as they ended, the running one `interrupted`, the rest not started; it
exits 128 + the signal, and the same command then finishes the batch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_batch_plan import _plan

# Runs the CLI with convert() patched so that the signal arrives while the second conversion runs:
# deterministic, unlike a kill timed from outside. argv: signal name, then the CLI's arguments.
DRIVER = textwrap.dedent(
    """
    import functools, os, signal, sys, threading, time
    import converter.writer.pipeline as pipeline

    real, calls, lock = pipeline.convert, [], threading.Lock()
    signum = getattr(signal, sys.argv[1])
    # Ctrl-C's usual handling: a shell starts background jobs (`make test &`, nohup) with SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler, so the test would hang
    signal.signal(signal.SIGINT, signal.default_int_handler)

    @functools.wraps(real)  # the plan's keys come from convert()'s signature
    def convert(*args, **kwargs):
        if kwargs.get("dry_run"):
            return real(*args, **kwargs)
        with lock:
            calls.append(1)
            second = len(calls) == 2
        if second:
            os.kill(os.getpid(), signum)
            time.sleep(60)  # the main thread's handler ends the batch long before this
        return real(*args, **kwargs)

    pipeline.convert = convert
    from converter.cli import main

    sys.argv = ["quantize-model", *sys.argv[2:]]
    main()
    """
)


def _run(signal_name: str, *args: str | Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", DRIVER, signal_name, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=50)


@pytest.mark.parametrize(("signal_name", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_interrupted_batch_writes_its_reports_and_resumes(
    qm, tiny_llama: Path, tmp_path: Path, signal_name: str, code: int
) -> None:
    from junitparser import Error, JUnitXml, Skipped

    plan = _plan(tmp_path, tiny_llama)  # three jobs
    junit, report = tmp_path / "ci" / "junit.xml", tmp_path / "ci" / "report.json"
    r = _run(signal_name, "batch", plan, "--junit", junit, "--json", report)
    assert r.returncode == code, r.stderr
    assert r.stderr.splitlines()[-1] == (
        f"Error: interrupted by {signal_name}: 1 of 3 job(s) ended, 1 interrupted, 1 not started; "
        "rerun the same batch to resume"
    )
    data = json.loads(report.read_text())
    assert data["interrupted"] == signal_name
    assert [i["status"] for i in data["items"]] == ["converted", "interrupted", "cancelled"]
    assert data["counts"]["interrupted"] == 1
    assert data["counts"]["cancelled"] == 1
    assert data["items"][1]["exit_code"] == code
    assert data["items"][1]["error"] == f"interrupted by {signal_name}; rerun the same batch to resume it"

    suite = next(iter(JUnitXml.fromfile(str(junit))))
    assert (suite.tests, suite.failures, suite.errors, suite.skipped) == (3, 0, 1, 1)
    cases = list(suite)
    assert cases[0].is_passed
    assert [type(x) for x in cases[1].result] == [Error]
    assert cases[1].result[0].type == "interrupted"
    assert [type(x) for x in cases[2].result] == [Skipped]

    again = qm("batch", plan, "--json", report, "-q")
    assert again.exit_code == 0, again.stderr
    statuses = [i["status"] for i in json.loads(report.read_text())["items"]]
    assert statuses == ["up-to-date", "converted", "converted"]
    assert qm("verify", tmp_path / "out" / "b128").exit_code == 0


def test_interrupted_parallel_batch_ends_without_waiting_for_running_jobs(
    tiny_llama: Path, tmp_path: Path
) -> None:
    plan = _plan(tmp_path, tiny_llama)
    report = tmp_path / "report.json"
    t0 = time.monotonic()
    r = _run("SIGTERM", "batch", plan, "--jobs", "3", "--json", report, "-q")
    # the job that got the signal sleeps 60 s in its worker thread; the process does not wait for it
    assert time.monotonic() - t0 < 45
    assert r.returncode == 143, r.stderr
    data = json.loads(report.read_text())
    statuses = [i["status"] for i in data["items"]]
    assert "interrupted" in statuses
    assert "failed" not in statuses
    assert set(statuses) <= {"converted", "interrupted", "cancelled"}


# The signal arrives while the CLI is still being imported (the first fraction of a second of every
# run, about a second on a loaded machine), before the plan is read: sent when `click` is imported.
EARLY_DRIVER = textwrap.dedent(
    """
    import builtins, os, signal, sys

    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in DRIVER
    signum = getattr(signal, sys.argv[1])
    sys.argv = ["quantize-model", *sys.argv[2:]]
    real_import = builtins.__import__

    def import_(name, *args, **kwargs):
        if name == "click" and "click" not in sys.modules:
            os.kill(os.getpid(), signum)
        return real_import(name, *args, **kwargs)

    builtins.__import__ = import_
    from converter.__main__ import main

    main()
    """
)


@pytest.mark.parametrize(("signal_name", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_batch_interrupted_while_it_starts_still_writes_its_reports(
    tiny_llama: Path, tmp_path: Path, signal_name: str, code: int
) -> None:
    """A signal in the batch's first ~0.3 s (importing the CLI, reading the plan) left no report at all
    (SIGTERM killed the process outright; Ctrl-C exited 130 with one line): the reports are now
    written with every job not started, as for a signal later on."""
    from junitparser import JUnitXml, Skipped

    plan = _plan(tmp_path, tiny_llama)
    junit, report = tmp_path / "junit.xml", tmp_path / "report.json"
    cmd = [sys.executable, "-c", EARLY_DRIVER, signal_name, "batch", plan, "--junit", junit, "--json", report]
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=50)
    assert r.returncode == code, r.stderr
    assert r.stderr.splitlines()[-1] == (
        f"Error: interrupted by {signal_name}: 0 of 3 job(s) ended, 0 interrupted, 3 not started; "
        "rerun the same batch to resume"
    )
    data = json.loads(report.read_text())
    assert data["interrupted"] == signal_name
    assert [i["status"] for i in data["items"]] == ["cancelled"] * 3
    suite = next(iter(JUnitXml.fromfile(str(junit))))
    assert all(isinstance(x, Skipped) for case in suite for x in case.result)
    assert not (tmp_path / "out").exists()
