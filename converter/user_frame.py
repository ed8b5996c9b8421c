"""Where a warning should point: the first frame outside this project's packages (the user's call).

A fixed ``stacklevel`` breaks when one function is reached through call chains of different depths
(``load_quantized`` and ``inspect --memory`` both build the model skeleton, through ``timing`` wrappers
and ``contextlib`` managers); walking the stack finds the user's line from any of them.
"""

from __future__ import annotations

import sys

#: Top-level modules whose frames a warning skips: ours, and contextlib's ``__enter__``/``__exit__``.
_INTERNAL = frozenset({"converter", "formats", "contextlib"})


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes ``warnings.warn``, called in the function that calls this, name
    the first frame outside converter/formats (1: that function itself, if it is the user's)."""
    frame = sys._getframe(1)  # the function about to call warnings.warn: stacklevel 1
    level = 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").split(".")[0] in _INTERNAL:
        frame = frame.f_back
        level += 1
    return level
