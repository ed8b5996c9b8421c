"""The ``quantize-model`` console script (and ``python -m converter``).

Kept apart from ``converter.cli`` so that Ctrl-C while the CLI is still importing (click, rich, the
commands: about a second on a loaded machine) ends like any other Ctrl-C, one line and exit code 130,
instead of a traceback from inside an import.
"""

from __future__ import annotations

import sys


def main() -> None:
    from converter import batch_signals

    if batch_signals.is_batch(sys.argv[1:]):  # a signal from now on still leaves the batch's reports
        batch_signals.install()
    try:
        from converter.cli import main as run
    except KeyboardInterrupt:
        # the CLI's own message for KeyboardInterrupt (converter.cli._app's error table), without it
        sys.stderr.write("Error: interrupted; rerun the same command to resume\n")
        raise SystemExit(130) from None
    run()


if __name__ == "__main__":
    main()
