// A small persistent thread pool for the CPU kernels.
//
// Sized from the CPU affinity mask (sched_getaffinity), so a process pinned to k cores uses k threads.
// Workers are created once and reused across calls; a call may ask for more threads than that (tests
// use 7 on 2 cores to exercise chunk boundaries), and the pool grows to match. Every task runs with
// the denormal flags cleared (MXCSR FTZ and DAZ off), so results never depend on state inherited from
// the caller or from other libraries.
#pragma once

#include <cstdint>
#include <functional>

namespace qm {

// Number of CPUs in this process's affinity mask (at least 1).
int affinity_cpu_count();

// Threads used when the caller passes threads <= 0: affinity_cpu_count().
int default_threads();

// Runs fn(begin, end) over [0, n) split into contiguous chunks of a multiple of `grain` items, on up to
// `threads` threads (the calling thread included). threads == 0 means default_threads(); threads < 0
// means -threads threads of the process's OpenMP team (omp_team.h; our pool when no OpenMP runtime is
// loaded). Chunks are
// handed out dynamically; which thread runs a chunk never changes the result, because every kernel
// writes disjoint outputs per item. Calls from several threads that use the pool are serialized; a call
// that runs on one thread (threads == 1, or one chunk) runs at once on the caller (quality statistics
// on their own thread do not hold up the converter's kernels or its GPU staging copies).
void parallel_for(int64_t n, int threads, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

// RAII: clears the flush-to-zero / denormals-are-zero flags for the current thread and restores them
// after (x86: MXCSR FTZ bit 15 and DAZ bit 6; AArch64: FPCR FZ and FZ16).
class ScopedDenormalsOn {
 public:
  ScopedDenormalsOn();
  ~ScopedDenormalsOn();
  ScopedDenormalsOn(const ScopedDenormalsOn&) = delete;
  ScopedDenormalsOn& operator=(const ScopedDenormalsOn&) = delete;

 private:
  uint64_t saved_;
};

}  // namespace qm
