"""How many threads a CPU kernel launch of the loader's decode path uses (one policy for every GEMV).

The kernels' ``threads`` argument: 1 = the calling thread alone, 0 = our C++ pool on every CPU
(csrc/thread_pool.cpp), -k = k threads of torch's own OpenMP team (csrc/omp_team.cpp: the extension
calls the ``GOMP_parallel`` of the OpenMP runtime torch loaded). Which one wins:

- torch's OpenMP workers spin after each parallel region (OpenMP's default active wait) when torch runs
  more than one intra-op thread. Our pool's workers then share the cores with spinning threads and a
  launch waits for a descheduled worker (MoE decode, 2 cores: 17 tok/s with the pool, 43 on the calling
  thread alone; docs/benchmarks.md). On torch's team the spinning workers are the ones that take the
  work, at once: from :data:`TEAM_MIN_BYTES` of codes on (SmolLM2-135M's 576x576 layer, 166 KB) a launch
  there beats the calling thread (docs/benchmarks.md, "GEMV launches on torch's OpenMP team").
- ``OMP_WAIT_POLICY=passive`` or one torch thread: nothing spins; waking any worker costs about what it
  saves below :data:`POOL_MIN_BYTES` (~100 µs on one core), so smaller launches stay on the calling
  thread and larger ones take our pool (a second core torch leaves idle).

The thread count never changes a result (each output row is computed by one thread in a fixed order).
"""

from __future__ import annotations

import os

import torch

from converter import _kernels

#: Packed 4-bit bytes a launch must read before the pool's sleeping workers are woken for it.
POOL_MIN_BYTES = 1 << 20

#: Packed bytes a launch must read before it is split over torch's (spinning) OpenMP team.
TEAM_MIN_BYTES = 96 << 10

#: ``OMP_WAIT_POLICY=passive`` at import. The OpenMP runtime reads the variable once, when it starts
#: (torch's import), so a later change of ``os.environ`` does not change whether its workers spin; read
#: once here too (reading the environment cost ~1 µs of the ~13 µs of each decode GEMV's launch).
OMP_PASSIVE = os.environ.get("OMP_WAIT_POLICY", "").lower() == "passive"


def omp_workers_spin() -> bool:
    """Whether torch's OpenMP workers may busy-wait between ops (more than one thread, active wait)."""
    return not OMP_PASSIVE and torch.get_num_threads() > 1


def gemv_threads(packed_bytes: int) -> int:
    """Kernel ``threads`` argument for a GEMV reading ``packed_bytes`` of codes (bf16 weights: their
    bytes): -torch.get_num_threads() (torch's team) while its workers spin and the launch is large
    enough, else 1 (the calling thread alone) for small work or while torch's workers spin, else 0
    (the pool: every CPU)."""
    if omp_workers_spin():
        if packed_bytes >= TEAM_MIN_BYTES and _kernels.omp_team_available():
            return -torch.get_num_threads()
        return 1
    return 1 if packed_bytes < POOL_MIN_BYTES else 0
