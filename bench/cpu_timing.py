"""Timing shared by the CPU benchmarks: a median of repeated calls on a chosen clock.

``--clock wall`` times wall-clock seconds with the requested threads; ``--clock cpu`` runs every
contender on one thread and times that thread's CPU time (``time.thread_time``, page faults
included), which other work on a shared machine disturbs much less.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from converter.kernels.isa_env import running_isa

_clock: Callable[[], float] = time.perf_counter


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    """Median over ``repeat`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = _clock()
        fn()
        times.append(_clock() - start)
    return statistics.median(times)


def parse_args(description: str, default_repeat: int) -> argparse.Namespace:
    """--repeat, --threads, --clock; sets the clock and torch's threads, prints the run's settings."""
    global _clock
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repeat", type=int, default=default_repeat)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: single-threaded everything, timed in thread CPU time (robust on a shared machine)",
    )
    args = parser.parse_args()
    if args.clock == "cpu":
        _clock = time.thread_time
        args.threads = 1
    torch.set_num_threads(args.threads)
    isa = running_isa()  # QM_CPU_ISA forces one; it printed the best path then too
    print(
        f"clock={args.clock} threads={args.threads} repeat={args.repeat} isa={isa} torch={torch.__version__}"
    )
    return args
