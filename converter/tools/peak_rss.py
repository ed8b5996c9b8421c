"""Peak resident memory of this process while a block runs, from /proc/self/status (Linux).

For the memory tests and benchmarks that run the measured call in a fresh interpreter (a child
script): they share this sampler instead of each carrying its own copy. Standard library only, so
importing it moves the baseline by nothing the measured call would not import anyway.

    with PeakRss(("RssAnon", "RssFile")) as rss:
        load_quantized(...)
    rss.grown["RssAnon"]  # peak above the process just before the block, in bytes
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

__all__ = ["PeakRss", "status"]

STATUS = Path("/proc/self/status")


def status(keys: Iterable[str] = ("RssAnon",)) -> dict[str, int]:
    """Those fields of /proc/self/status in bytes: ``RssAnon`` (heap: tensors), ``RssFile`` (file-backed:
    mapped shards, offload files; the page cache's, reclaimable), ``VmRSS``, ``VmHWM``, ..."""
    wanted = list(keys)
    out: dict[str, int] = {}
    with STATUS.open() as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in wanted:
                out[key] = int(value.split()[0]) * 1024  # "kB"
                if len(out) == len(wanted):
                    break
    missing = [k for k in wanted if k not in out]
    if missing:
        msg = f"{STATUS} has no field {', '.join(missing)}"
        raise KeyError(msg)
    return {k: out[k] for k in wanted}


class PeakRss:
    """``with PeakRss(keys) as rss: work()``: the ``keys`` of /proc/self/status just before the block
    (``rss.before``), their highest values while it ran (``rss.peak``: sampled every ``period`` seconds
    on a thread, which runs while torch kernels release the GIL, and once more as the block ends), the
    values as it ended (``rss.after``) and ``rss.grown`` = peak - before."""

    def __init__(self, keys: Iterable[str] = ("RssAnon",), period: float = 0.0005) -> None:
        self.keys, self.period = tuple(keys), period
        self.before: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.after: dict[str, int] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)

    @property
    def grown(self) -> dict[str, int]:
        return {k: self.peak[k] - self.before[k] for k in self.keys}

    def _sample(self) -> dict[str, int]:
        now = status(self.keys)
        for key, value in now.items():
            self.peak[key] = max(self.peak[key], value)
        return now

    def _run(self) -> None:
        while not self._done.is_set():
            self._sample()
            time.sleep(self.period)

    def __enter__(self) -> PeakRss:
        self.before = status(self.keys)
        self.peak = dict(self.before)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._done.set()
        self._thread.join()
        self.after = self._sample()
