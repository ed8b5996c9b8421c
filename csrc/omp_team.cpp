#include "omp_team.h"

#include <dlfcn.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <exception>
#include <mutex>
#include <thread>

#include "thread_pool.h"

namespace qm {

namespace {

// libgomp's entry point for `#pragma omp parallel` (GCC >= 4.9; also exported by Intel's libiomp5 and
// LLVM's libomp): runs fn(data) on a team of num_threads threads, the caller being thread 0.
using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);

// Set in a forked child: libgomp's team threads do not exist there and a region would wait for them
// forever; the child's launches take our pool instead (which starts over after a fork).
std::atomic<bool> g_forked{false};

GompParallel resolve() {
  static const GompParallel fn = [] {
    pthread_atfork(nullptr, nullptr, [] { g_forked.store(true); });
    return reinterpret_cast<GompParallel>(dlsym(RTLD_DEFAULT, "GOMP_parallel"));
  }();
  return g_forked.load(std::memory_order_relaxed) ? nullptr : fn;
}

using Clock = std::chrono::steady_clock;

struct Job {
  const std::function<void(int64_t, int64_t)>* fn;
  int64_t n, chunk;
  std::thread::id caller;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> helped{0};  // chunks run by team threads other than the caller
  Clock::time_point start, caller_done;  // the launch; the caller found no chunk left
  std::mutex error_mutex;
  std::exception_ptr error;
};

// Back-off after a late launch: its helpers took no chunk, or the caller waited at the region's closing
// barrier longer than half its own busy time (+20 µs). Either means a helper was not on a core (a busy
// machine), and the barrier made the caller wait until the OS ran it (up to a time slice, where the
// launch itself takes microseconds). The next `skip` launches run on the caller alone; the skip doubles
// while launches keep being late and resets after one that was not.
constexpr int64_t kSkipFirst = 64, kSkipMax = 1 << 14;
constexpr auto kLateSlack = std::chrono::microseconds(20);
std::atomic<int64_t> g_skip_left{0}, g_skip_next{kSkipFirst};

// Every team thread takes chunks until none is left (no exception may leave an OpenMP region).
void team_body(void* data) {
  Job& job = *static_cast<Job*>(data);
  ScopedDenormalsOn denormals;
  const bool helper = std::this_thread::get_id() != job.caller;
  for (;;) {
    const int64_t begin = job.next.fetch_add(1, std::memory_order_relaxed) * job.chunk;
    if (begin >= job.n) {
      if (!helper) job.caller_done = Clock::now();
      return;
    }
    if (helper) job.helped.fetch_add(1, std::memory_order_relaxed);
    try {
      (*job.fn)(begin, std::min(job.n, begin + job.chunk));
    } catch (...) {
      std::lock_guard<std::mutex> lock(job.error_mutex);
      if (!job.error) job.error = std::current_exception();
    }
  }
}

}  // namespace

bool omp_team_available() { return resolve() != nullptr; }

bool omp_team_run(int64_t n, int threads, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn) {
  const GompParallel parallel = resolve();
  if (parallel == nullptr) return false;
  Job job;
  job.fn = &fn;
  job.n = n;
  job.chunk = std::max<int64_t>(chunk, 1);
  job.caller = std::this_thread::get_id();
  job.start = Clock::now();
  const int64_t n_chunks = (n + job.chunk - 1) / job.chunk;
  auto team = static_cast<unsigned>(std::clamp<int64_t>(n_chunks, 1, threads));
  if (team > 1 && g_skip_left.load(std::memory_order_relaxed) > 0) {
    g_skip_left.fetch_sub(1, std::memory_order_relaxed);
    team = 1;
  }
  if (team == 1) {
    team_body(&job);  // no region for one thread
  } else {
    parallel(team_body, &job, team, 0);
    const Clock::duration waited = Clock::now() - job.caller_done;
    const Clock::duration busy = job.caller_done - job.start;
    if (job.helped.load(std::memory_order_relaxed) == 0 || waited > busy / 2 + kLateSlack) {
      const int64_t skip = g_skip_next.load(std::memory_order_relaxed);
      g_skip_left.store(skip, std::memory_order_relaxed);
      g_skip_next.store(std::min(skip * 2, kSkipMax), std::memory_order_relaxed);
    } else {
      g_skip_next.store(kSkipFirst, std::memory_order_relaxed);
    }
  }
  if (job.error) std::rethrow_exception(job.error);
  return true;
}

}  // namespace qm
