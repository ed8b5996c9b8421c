"""A conversion killed mid-run: a child Python that SIGKILLs itself where its script says (resume tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def run_until_killed(script: str, *args: object) -> None:
    """Run ``python -c script *args`` (warnings off) and assert that it ended by SIGKILL, showing its
    stderr otherwise (a script that finished, or failed before its kill, tests nothing)."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        timeout=300,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
