"""How many threads a CPU kernel launch of the loader's decode path uses (one policy for every GEMV).

Our C++ pool (csrc/thread_pool.cpp) wakes its workers for each launch. Two things make that a loss
for the small GEMVs of decode (batch 1..8):

- the work is too small to split: below :data:`POOL_MIN_BYTES` of packed codes (~100 µs on one core),
  waking a worker costs about what it saves (SmolLM2-135M's largest layer, 1536×576, is 442 KB; on the
  2-core VM the calling thread alone was as fast or faster at every size up to 2048×1024);
- torch's OpenMP workers spin after each parallel torch op (OpenMP's default active wait) when torch
  runs more than one intra-op thread; our workers then share the cores with spinning threads and a
  launch waits for a descheduled worker (MoE decode, 2 cores: 17 tok/s with the pool, 43 on the
  calling thread alone; docs/benchmarks.md). ``OMP_WAIT_POLICY=passive`` or one torch thread: no spin.

The thread count never changes a result (each output row is computed by one thread in a fixed order).
"""

from __future__ import annotations

import os

import torch

#: Packed 4-bit bytes a launch must read before the pool's workers are woken for it.
POOL_MIN_BYTES = 1 << 20


def omp_workers_spin() -> bool:
    """Whether torch's OpenMP workers may busy-wait between ops (more than one thread, active wait)."""
    return torch.get_num_threads() > 1 and os.environ.get("OMP_WAIT_POLICY", "").lower() != "passive"


def gemv_threads(packed_bytes: int) -> int:
    """Kernel ``threads`` argument for a GEMV reading ``packed_bytes`` of codes: 1 (the calling thread
    alone) for small work or while torch's workers spin, else 0 (the pool: every CPU)."""
    if packed_bytes < POOL_MIN_BYTES or omp_workers_spin():
        return 1
    return 0
