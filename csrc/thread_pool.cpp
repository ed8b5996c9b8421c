#include "thread_pool.h"

#include "omp_team.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

// The denormal flags are per architecture (not per SIMD path: the scalar path needs them too).
#if defined(__x86_64__) || defined(__i386__)
#define QM_MXCSR 1
#include <xmmintrin.h>
#else
#define QM_MXCSR 0
#endif

namespace qm {

namespace {

#if QM_MXCSR
constexpr unsigned int kMxcsrDaz = 1u << 6;
constexpr unsigned int kMxcsrFtz = 1u << 15;
#elif defined(__aarch64__)
constexpr uint64_t kFpcrFz = uint64_t{1} << 24;    // flush-to-zero
constexpr uint64_t kFpcrFz16 = uint64_t{1} << 19;  // flush-to-zero for half precision
#endif
constexpr int kMaxThreads = 256;

// One job at a time. The caller publishes the job, takes chunks itself, then closes the job: workers
// that wake up after that skip it, so a worker the OS has not scheduled yet never delays the caller
// (on a busy machine that wait would be a whole scheduler time slice). The caller only waits for
// workers that joined and still run a chunk.
class Pool {
 public:
  static Pool& instance() {
    static const bool registered = [] {
      // A forked child has none of the parent's worker threads, and a mutex the parent held at the
      // fork stays locked: the child starts over with a fresh pool (the old one is left as is).
      pthread_atfork(nullptr, nullptr, [] { current() = new Pool(); });
      return true;
    }();
    (void)registered;
    if (current() == nullptr) current() = new Pool();  // never destroyed: workers outlive static dtors
    return *current();
  }

  void run(int64_t n, int threads, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn) {
    const int64_t n_chunks = (n + chunk - 1) / chunk;
    const int helpers = static_cast<int>(std::min<int64_t>(threads, n_chunks)) - 1;
    if (helpers <= 0) {  // on the calling thread alone: no pool state, so no wait for other callers
      ScopedDenormalsOn denormals;
      fn(0, n);
      return;
    }
    std::lock_guard<std::mutex> call_lock(call_mutex_);  // serialize callers (GIL is released)
    grow(helpers);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fn_ = &fn;
      n_ = n;
      chunk_ = chunk;
      next_.store(0, std::memory_order_relaxed);
      max_helpers_ = helpers;
      open_ = true;
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    work();  // the caller takes chunks too; returns when every chunk has been handed out
    std::unique_lock<std::mutex> lock(mutex_);
    open_ = false;  // late wakers skip this job
    done_.wait(lock, [&] { return active_ == 0; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  Pool() = default;

  static Pool*& current() {
    static Pool* pool = nullptr;
    return pool;
  }

  void grow(int helpers) {
    std::lock_guard<std::mutex> lock(mutex_);
    while (static_cast<int>(workers_.size()) < helpers) {
      const int id = static_cast<int>(workers_.size());
      workers_.emplace_back([this, id] { loop(id); });
      workers_.back().detach();
    }
  }

  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (!open_ || id >= max_helpers_) continue;
        ++active_;
      }
      work();
      std::lock_guard<std::mutex> lock(mutex_);
      if (--active_ == 0) done_.notify_one();
    }
  }

  void work() {
    ScopedDenormalsOn denormals;
    for (;;) {
      const int64_t c = next_.fetch_add(1, std::memory_order_relaxed);
      const int64_t begin = c * chunk_;
      if (begin >= n_) return;
      try {
        (*fn_)(begin, std::min(n_, begin + chunk_));
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
      }
    }
  }

  std::mutex call_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0, chunk_ = 1;
  std::atomic<int64_t> next_{0};
  int max_helpers_ = 0, active_ = 0;
  bool open_ = false;
  uint64_t generation_ = 0;
  std::exception_ptr error_;
};

}  // namespace

int affinity_cpu_count() {
#ifdef __linux__
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int count = CPU_COUNT(&set);
    if (count > 0) return count;
  }
#endif
  const unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? static_cast<int>(hw) : 1;
}

int default_threads() {
  static const int threads = affinity_cpu_count();
  return threads;
}

void parallel_for(int64_t n, int threads, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  const bool team = threads < 0;
  if (team) threads = -threads;
  if (threads == 0) threads = default_threads();
  threads = std::min(threads, kMaxThreads);
  grain = std::max<int64_t>(grain, 1);
  // About 4 chunks per thread: dynamic hand-out evens out cores shared with other work.
  const int64_t per = (n + int64_t{threads} * 4 - 1) / (int64_t{threads} * 4);
  const int64_t chunk = (std::max(grain, per) + grain - 1) / grain * grain;  // a multiple of grain
  if (team && omp_team_run(n, threads, chunk, fn)) return;
  Pool::instance().run(n, threads, chunk, fn);
}

#if QM_MXCSR
ScopedDenormalsOn::ScopedDenormalsOn() : saved_(_mm_getcsr()) {
  _mm_setcsr(static_cast<unsigned int>(saved_) & ~(kMxcsrDaz | kMxcsrFtz));
}

ScopedDenormalsOn::~ScopedDenormalsOn() { _mm_setcsr(static_cast<unsigned int>(saved_)); }
#elif defined(__aarch64__)
ScopedDenormalsOn::ScopedDenormalsOn() {
  uint64_t fpcr;
  asm volatile("mrs %0, fpcr" : "=r"(fpcr));
  saved_ = fpcr;
  fpcr &= ~(kFpcrFz | kFpcrFz16);
  asm volatile("msr fpcr, %0" : : "r"(fpcr));
}

ScopedDenormalsOn::~ScopedDenormalsOn() {
  const uint64_t fpcr = saved_;
  asm volatile("msr fpcr, %0" : : "r"(fpcr));
}
#else
// Other architectures: IEEE denormal handling is the default and left as the caller set it.
ScopedDenormalsOn::ScopedDenormalsOn() : saved_(0) {}
ScopedDenormalsOn::~ScopedDenormalsOn() = default;
#endif

}  // namespace qm
