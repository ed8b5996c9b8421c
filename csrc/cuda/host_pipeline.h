// Quantize host buffers (numpy arrays, memory maps) on the GPU without torch: the --device cuda path
// of the converter (converter/cuda_host.py).
//
// One HostPipeline owns a CUDA stream, device buffers and pinned staging, and one worker thread that
// runs the submitted tensors in order. Each tensor streams through in chunks of `chunk_bytes` input
// bytes (a multiple of the blocksize, so chunks quantize independently and the bytes equal one launch
// over the whole tensor), with two pinned slots: while the GPU uploads, quantizes and downloads chunk
// c, the worker copies chunk c+1 from the caller's buffer into the other slot (on the CPU thread pool)
// and then copies chunk c's packed codes out of its slot. absmax stays on the device for the whole
// tensor; with `nested` the nested quantization runs on it after the last chunk. Results land in the
// caller's host buffers, which must stay alive (and the input unchanged) until wait() returns.
//
// Plain C++ interface (no CUDA or Python types); status codes as in qm_cuda.h.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace qm {
namespace cuda {

// Creates the CUDA context of `device` (cudaSetDevice + cudaFree(0)); 0 or a positive cudaError_t.
int init_device(int device);

struct HostJob {
  uintptr_t x = 0;           // host input, n elements of dtype (qm_cuda.h DType), read only
  int dtype = 0;
  int64_t n = 0;             // > 0
  uintptr_t packed = 0;      // host out: uint8 [(n+1)/2]
  uintptr_t absmax = 0;      // host out: float32 [ceil(n/blocksize)]
  uintptr_t codes = 0;       // host out (nested only): uint8 [nb]
  uintptr_t nested_absmax = 0;  // host out (nested only): float32 [ceil(nb/256)]
};

struct HostJobResult {
  int status = 0;        // 0, a negative Status or a positive cudaError_t
  bool nonfinite = false;  // some element was NaN or Inf (outputs then hold no meaning)
  float offset = 0.0f;   // nested offset
  // Seconds: host copies into pinned staging, and (CUDA events) upload, kernels, download.
  double stage = 0.0, upload = 0.0, kernels = 0.0, download = 0.0;
};

class HostPipeline {
 public:
  // mids: the 255 dynamic-8 midpoints (formats.codebooks.DYNAMIC8_MIDPOINTS). threads <= 0: one per CPU.
  HostPipeline(int device, int quant_type, int blocksize, bool nested, int64_t chunk_bytes, int threads,
               std::vector<float> mids);
  ~HostPipeline();  // waits for the tensor being processed, drops queued ones, frees everything
  HostPipeline(const HostPipeline&) = delete;
  HostPipeline& operator=(const HostPipeline&) = delete;

  // Queues a tensor; returns its ticket. Arguments are checked here (negative Status on error).
  int64_t submit(const HostJob& job);
  // Blocks until the ticket's tensor is done and returns its result (each ticket once).
  HostJobResult wait(int64_t ticket);

 private:
  void loop();
  int setup();
  int run(const HostJob& job, HostJobResult* r);
  int reserve(int64_t nb);
  void release();

  const int device_, quant_type_, blocksize_, threads_;
  const bool nested_;
  const int64_t chunk_bytes_;
  const std::vector<float> mids_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<int64_t, HostJob>> queue_;
  std::map<int64_t, HostJobResult> done_;
  int64_t next_ticket_ = 1;
  int64_t running_ = 0;  // ticket the worker is processing (0: none)
  bool stop_ = false;
  std::thread worker_;

  // Worker-thread state (CUDA handles as void*: no CUDA types in this header).
  int setup_status_ = 0;
  void* stream_ = nullptr;
  void* events_[2][4] = {};  // per slot: upload start, upload end, kernels end, download end
  void* pin_in_[2] = {};     // chunk_bytes each
  void* pin_out_[2] = {};    // chunk_bytes / 4 each (packed codes of a chunk)
  void* dev_in_ = nullptr;
  void* dev_packed_ = nullptr;
  void* dev_flag_ = nullptr;    // int32 [1] then float32 [1] offset
  void* dev_mids_ = nullptr;
  void* pin_scalars_ = nullptr;  // int32 flag, float32 offset
  int64_t nb_cap_ = 0;
  void* dev_absmax_ = nullptr;
  void* dev_codes_ = nullptr;
  void* dev_nabs_ = nullptr;
  void* dev_sums_ = nullptr;
};

}  // namespace cuda
}  // namespace qm
