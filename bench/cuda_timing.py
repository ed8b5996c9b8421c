"""Timing shared by the CUDA benchmarks: CUDA-event medians, CUDA-graph replays, the copy floor.

- :func:`time_op`: each call bracketed by CUDA events while the host queues every call ahead of the
  GPU, so the events time GPU work and not Python's launch overhead; inputs rotate through
  :func:`rotation_for` buffers so that every call reads from device memory, not from L2.
- :func:`time_graph`: the work captured once in a CUDA graph (:func:`capture_graph`), each replay timed.
- :func:`copy_bandwidth`: the floor the benchmarks compare with, a 1 GiB device-to-device copy, the
  fastest of the ways it is timed.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def time_op(fn: Callable[[int], object], rotation: int, iters: int, warmup: int = 5) -> float:
    """Median seconds of fn(i % rotation) over iters calls, each bracketed by CUDA events."""
    for i in range(warmup):
        fn(i % rotation)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    # Keep the GPU busy while the host queues every call, so the events time the GPU work and not
    # Python's launch overhead (the same for ours and bitsandbytes).
    torch.cuda._sleep(40_000_000)
    for i in range(iters):
        starts[i].record()
        fn(i % rotation)
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)) / 1e3


def rotation_for(nbytes: int) -> int:
    """How many inputs of ``nbytes`` to rotate through so that together they exceed twice the L2 cache."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, -(-2 * l2 // max(1, nbytes)) + 1)


def capture_graph(launch: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """A CUDA graph of launch(), after one warm-up call on a side stream (as torch.cuda.graph requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        launch()  # warm-up outside capture (allocations, first-call set-up)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()
    return graph


def time_graph(launch: Callable[[], object], replays: int) -> float:
    """Median seconds of one replay of a graph that captured launch()."""
    graph = capture_graph(launch)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del graph
    return statistics.median(times)


def copy_bandwidth(iters: int, *, graph: bool = False) -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy: the fastest of the ways we time
    it, so that the floor is never understated.

    Timed eagerly (``time_op``), ``dst.copy_(src)`` is a driver copy kernel at ~4.3 TB/s on an H200.
    Captured in a CUDA graph the same call becomes a memcpy node, which ran at only ~2.8 TB/s there
    (2026-12-04): a floor from it alone made our kernels look 1.55x closer to the floor than they were.
    ``graph=True`` therefore also times an element-wise kernel copy (``torch.neg`` on int16) inside a
    graph and the eager copy, and returns the highest rate.
    """
    src = torch.empty(1 << 29, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    times = [time_op(lambda i: dst.copy_(src), 1, iters)]
    if graph:
        times.append(time_graph(lambda: dst.copy_(src), iters))
        times.append(time_graph(lambda: torch.neg(src, out=dst), iters))
    names = ("eager copy_", "graph copy_ (memcpy node)", "graph neg (kernel)")[: len(times)]
    rates = ", ".join(f"{n} {2 * (1 << 30) / t / 1e9:.0f}" for n, t in zip(names, times, strict=True))
    print(f"copy floor, GB/s read + written: {rates}")
    return 2 * (1 << 30) / min(times)
