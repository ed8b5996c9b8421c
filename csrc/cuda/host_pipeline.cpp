// HostPipeline (host_pipeline.h): chunked host -> GPU -> host quantization on one worker thread.
#include "host_pipeline.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <utility>

#include "qm_cuda.h"
#include "thread_pool.h"

namespace qm {
namespace cuda {

namespace {

constexpr int64_t kMinChunkBytes = int64_t{1} << 16;  // >= 4 bytes x the largest blocksize (4096)
constexpr int64_t kCopyGrain = int64_t{1} << 18;      // bytes per thread-pool task of a host copy
constexpr int kMids = 255;

bool valid_blocksize(int bs) { return bs >= 32 && bs <= 4096 && (bs & (bs - 1)) == 0; }

int64_t element_size(int dtype) { return dtype == kF32 ? 4 : 2; }

// memcpy on the CPU thread pool: a memory-mapped source faults its pages in on several cores.
void copy_parallel(void* dst, const void* src, int64_t bytes, int threads) {
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  if (bytes <= kCopyGrain) {
    std::memcpy(d, s, static_cast<size_t>(bytes));
    return;
  }
  parallel_for(bytes, threads, kCopyGrain, [&](int64_t b, int64_t e) {
    std::memcpy(d + b, s + b, static_cast<size_t>(e - b));
  });
}

double seconds_between(void* a, void* b) {
  float ms = 0.0f;
  if (cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(a), static_cast<cudaEvent_t>(b)) != cudaSuccess) {
    cudaGetLastError();
    return 0.0;
  }
  return static_cast<double>(ms) / 1e3;
}

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

#define QM_TRY(call)                                        \
  do {                                                      \
    const cudaError_t qm_e = (call);                        \
    if (qm_e != cudaSuccess) return static_cast<int>(qm_e); \
  } while (0)

}  // namespace

int init_device(int device) {
  QM_TRY(cudaSetDevice(device));
  QM_TRY(cudaFree(nullptr));  // creates the primary context now, not at the first allocation
  return kOk;
}

HostPipeline::HostPipeline(int device, int quant_type, int blocksize, bool nested, int64_t chunk_bytes,
                           int threads, std::vector<float> mids)
    : device_(device),
      quant_type_(quant_type),
      blocksize_(blocksize),
      threads_(threads),
      nested_(nested),
      chunk_bytes_(std::max(chunk_bytes, kMinChunkBytes) / kMinChunkBytes * kMinChunkBytes),
      mids_(std::move(mids)) {
  if (device < 0) throw std::invalid_argument("device must be >= 0");
  if (!valid_blocksize(blocksize)) throw std::invalid_argument(status_text(kBadBlocksize));
  if (quant_type != kNF4 && quant_type != kFP4) throw std::invalid_argument(status_text(kBadQuantType));
  if (static_cast<int>(mids_.size()) != kMids) throw std::invalid_argument("mids must hold 255 midpoints");
  worker_ = std::thread([this] { loop(); });
}

HostPipeline::~HostPipeline() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();
}

int64_t HostPipeline::submit(const HostJob& job) {
  if (job.dtype != kF32 && job.dtype != kF16 && job.dtype != kBF16) return kBadDtype;
  if (job.n <= 0 || job.n / 16 / 256 >= (int64_t{1} << 31)) return kBadSize;
  if (job.x == 0 || job.packed == 0 || job.absmax == 0) return kBadSize;
  if (nested_ && (job.codes == 0 || job.nested_absmax == 0)) return kBadSize;
  int64_t ticket;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ticket = next_ticket_++;
    queue_.emplace_back(ticket, job);
  }
  cv_.notify_all();
  return ticket;
}

HostJobResult HostPipeline::wait(int64_t ticket) {
  std::unique_lock<std::mutex> lock(mu_);
  const bool queued = std::any_of(queue_.begin(), queue_.end(), [&](const auto& q) { return q.first == ticket; });
  if (ticket <= 0 || ticket >= next_ticket_ || (!queued && done_.count(ticket) == 0 && ticket != running_)) {
    HostJobResult bad;
    bad.status = kBadSize;  // not submitted, or already waited for
    return bad;
  }
  cv_.wait(lock, [&] { return done_.count(ticket) != 0; });
  HostJobResult r = done_[ticket];
  done_.erase(ticket);
  return r;
}

void HostPipeline::loop() {
  setup_status_ = setup();
  for (;;) {
    std::pair<int64_t, HostJob> item;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (stop_) break;
      item = queue_.front();
      queue_.pop_front();
      running_ = item.first;
    }
    HostJobResult r;
    r.status = run(item.second, &r);
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_[item.first] = r;
      running_ = 0;
    }
    cv_.notify_all();
  }
  release();
}

int HostPipeline::setup() {
  QM_TRY(cudaSetDevice(device_));
  QM_TRY(cudaFree(nullptr));
  cudaStream_t st = nullptr;
  QM_TRY(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  stream_ = st;
  for (auto& slot : events_) {
    for (auto& ev : slot) {
      cudaEvent_t e = nullptr;
      QM_TRY(cudaEventCreate(&e));
      ev = e;
    }
  }
  for (int s = 0; s < 2; ++s) {
    QM_TRY(cudaHostAlloc(&pin_in_[s], static_cast<size_t>(chunk_bytes_), cudaHostAllocDefault));
    QM_TRY(cudaHostAlloc(&pin_out_[s], static_cast<size_t>(chunk_bytes_ / 4), cudaHostAllocDefault));
  }
  QM_TRY(cudaHostAlloc(&pin_scalars_, 16, cudaHostAllocDefault));
  QM_TRY(cudaMalloc(&dev_in_, static_cast<size_t>(chunk_bytes_)));
  QM_TRY(cudaMalloc(&dev_packed_, static_cast<size_t>(chunk_bytes_ / 4)));
  QM_TRY(cudaMalloc(&dev_flag_, 16));
  QM_TRY(cudaMalloc(&dev_mids_, kMids * sizeof(float)));
  QM_TRY(cudaMemcpy(dev_mids_, mids_.data(), kMids * sizeof(float), cudaMemcpyHostToDevice));
  return kOk;
}

int HostPipeline::reserve(int64_t nb) {
  if (nb <= nb_cap_) return kOk;
  const int64_t cap = std::max(nb, 2 * nb_cap_);
  for (void** p : {&dev_absmax_, &dev_codes_, &dev_nabs_, &dev_sums_}) {
    if (*p != nullptr) cudaFree(*p);
    *p = nullptr;
  }
  nb_cap_ = 0;
  QM_TRY(cudaMalloc(&dev_absmax_, static_cast<size_t>(cap) * sizeof(float)));
  if (nested_) {
    QM_TRY(cudaMalloc(&dev_codes_, static_cast<size_t>(cap)));
    QM_TRY(cudaMalloc(&dev_nabs_, static_cast<size_t>((cap + kNestedBlock - 1) / kNestedBlock) * sizeof(float)));
    // quantize_nested's scratch: per-chunk float64 sums and exponent ranges (qm_cuda.h)
    const int64_t sums = std::max<int64_t>(2, 2 * ((cap + kOffsetChunk - 1) / kOffsetChunk));
    QM_TRY(cudaMalloc(&dev_sums_, static_cast<size_t>(sums) * sizeof(double)));
  }
  nb_cap_ = cap;
  return kOk;
}

int HostPipeline::run(const HostJob& job, HostJobResult* r) {
  if (setup_status_ != kOk) return setup_status_;
  const auto st = static_cast<cudaStream_t>(stream_);
  const int64_t esz = element_size(job.dtype);
  const int64_t per_chunk = chunk_bytes_ / esz / blocksize_ * blocksize_;  // elements, a multiple of blocksize
  const int64_t nb = (job.n + blocksize_ - 1) / blocksize_;
  const int64_t chunks = (job.n + per_chunk - 1) / per_chunk;
  if (const int s = reserve(nb); s != kOk) return s;
  auto* flag = static_cast<int*>(dev_flag_);
  auto* offset = reinterpret_cast<float*>(static_cast<char*>(dev_flag_) + 4);
  QM_TRY(cudaMemsetAsync(dev_flag_, 0, 8, st));

  const auto* x = reinterpret_cast<const char*>(job.x);
  auto* packed = reinterpret_cast<uint8_t*>(job.packed);
  auto cev = [&](int s, int k) { return static_cast<cudaEvent_t>(events_[s][k]); };
  // Chunk c's codes are back in pin_out_[c & 1]: time it and copy them to the caller's buffer.
  auto finish = [&](int64_t c) -> int {
    const int s = static_cast<int>(c & 1);
    QM_TRY(cudaEventSynchronize(cev(s, 3)));
    r->upload += seconds_between(events_[s][0], events_[s][1]);
    r->kernels += seconds_between(events_[s][1], events_[s][2]);
    r->download += seconds_between(events_[s][2], events_[s][3]);
    const int64_t e0 = c * per_chunk, m = std::min(per_chunk, job.n - e0);
    copy_parallel(packed + e0 / 2, pin_out_[s], (m + 1) / 2, threads_);  // e0 is even
    return kOk;
  };

  int status = kOk;
  for (int64_t c = 0; c < chunks && status == kOk; ++c) {
    const int s = static_cast<int>(c & 1);
    const int64_t e0 = c * per_chunk, m = std::min(per_chunk, job.n - e0);
    // Slot s was last used by chunk c-2, finished (synchronised and copied out) during chunk c-1.
    const double t0 = now();
    copy_parallel(pin_in_[s], x + e0 * esz, m * esz, threads_);
    r->stage += now() - t0;
    if ((status = cudaEventRecord(cev(s, 0), st)) != cudaSuccess) break;
    if ((status = cudaMemcpyAsync(dev_in_, pin_in_[s], static_cast<size_t>(m * esz), cudaMemcpyHostToDevice, st)) !=
        cudaSuccess)
      break;
    if ((status = cudaEventRecord(cev(s, 1), st)) != cudaSuccess) break;
    // Blocks of chunk c start at element e0 (a multiple of blocksize): their absmax at e0 / blocksize.
    status = quantize_4bit(device_, reinterpret_cast<uintptr_t>(dev_in_), job.dtype, m, blocksize_, quant_type_,
                           reinterpret_cast<uintptr_t>(dev_packed_),
                           reinterpret_cast<uintptr_t>(static_cast<float*>(dev_absmax_) + e0 / blocksize_),
                           reinterpret_cast<uintptr_t>(flag), reinterpret_cast<uintptr_t>(st));
    if (status != kOk) break;
    if ((status = cudaEventRecord(cev(s, 2), st)) != cudaSuccess) break;
    if ((status = cudaMemcpyAsync(pin_out_[s], dev_packed_, static_cast<size_t>((m + 1) / 2), cudaMemcpyDeviceToHost,
                                  st)) != cudaSuccess)
      break;
    if ((status = cudaEventRecord(cev(s, 3), st)) != cudaSuccess) break;
    if (c > 0) status = finish(c - 1);
  }
  if (status == kOk) status = finish(chunks - 1);
  if (status != kOk) {
    cudaStreamSynchronize(st);  // nothing may still read or write the pinned slots
    cudaGetLastError();
    return status;
  }

  // The whole tensor's absmax is on the device: nest it, then bring every small output back.
  QM_TRY(cudaEventRecord(cev(0, 1), st));
  if (nested_) {
    if (const int s = quantize_nested(device_, reinterpret_cast<uintptr_t>(dev_absmax_), nb,
                                      reinterpret_cast<uintptr_t>(dev_mids_), reinterpret_cast<uintptr_t>(dev_sums_),
                                      reinterpret_cast<uintptr_t>(offset), reinterpret_cast<uintptr_t>(dev_codes_),
                                      reinterpret_cast<uintptr_t>(dev_nabs_), reinterpret_cast<uintptr_t>(st));
        s != kOk) {
      cudaStreamSynchronize(st);
      return s;
    }
  }
  QM_TRY(cudaEventRecord(cev(0, 2), st));
  QM_TRY(cudaMemcpyAsync(pin_scalars_, dev_flag_, 8, cudaMemcpyDeviceToHost, st));
  QM_TRY(cudaMemcpyAsync(reinterpret_cast<void*>(job.absmax), dev_absmax_, static_cast<size_t>(nb) * sizeof(float),
                         cudaMemcpyDeviceToHost, st));
  if (nested_) {
    QM_TRY(cudaMemcpyAsync(reinterpret_cast<void*>(job.codes), dev_codes_, static_cast<size_t>(nb),
                           cudaMemcpyDeviceToHost, st));
    QM_TRY(cudaMemcpyAsync(reinterpret_cast<void*>(job.nested_absmax), dev_nabs_,
                           static_cast<size_t>((nb + kNestedBlock - 1) / kNestedBlock) * sizeof(float),
                           cudaMemcpyDeviceToHost, st));
  }
  QM_TRY(cudaEventRecord(cev(0, 3), st));
  QM_TRY(cudaStreamSynchronize(st));
  r->kernels += seconds_between(events_[0][1], events_[0][2]);
  r->download += seconds_between(events_[0][2], events_[0][3]);
  int bad = 0;
  std::memcpy(&bad, pin_scalars_, 4);
  std::memcpy(&r->offset, static_cast<char*>(pin_scalars_) + 4, 4);
  r->nonfinite = bad != 0;
  return kOk;
}

void HostPipeline::release() {
  if (stream_ != nullptr) cudaStreamSynchronize(static_cast<cudaStream_t>(stream_));
  for (void* p : {dev_in_, dev_packed_, dev_flag_, dev_mids_, dev_absmax_, dev_codes_, dev_nabs_, dev_sums_}) {
    if (p != nullptr) cudaFree(p);
  }
  for (void* p : {pin_in_[0], pin_in_[1], pin_out_[0], pin_out_[1], pin_scalars_}) {
    if (p != nullptr) cudaFreeHost(p);
  }
  for (auto& slot : events_) {
    for (void* e : slot) {
      if (e != nullptr) cudaEventDestroy(static_cast<cudaEvent_t>(e));
    }
  }
  if (stream_ != nullptr) cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
  cudaGetLastError();
}

}  // namespace cuda
}  // namespace qm
