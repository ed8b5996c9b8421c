// Device discovery and error texts for the CUDA backend (host code only).
#include <cuda_runtime.h>

#include <string>

#include "qm_cuda.h"

namespace qm {
namespace cuda {

const char* status_text(int status) {
  switch (status) {
    case kOk: return "ok";
    case kBadDtype: return "unsupported dtype (expected float32, float16 or bfloat16)";
    case kBadBlocksize: return "unsupported blocksize (expected a power of two from 32 to 4096)";
    case kBadQuantType: return "unsupported quant type (expected nf4 or fp4)";
    case kBadSize: return "size out of range";
    case kBadBatch: return "batch out of range (the fused GEMV takes 1 to 8 rows of x)";
    case kNoDevice: return "no usable CUDA device";
    default: return "unknown status";
  }
}

std::string cuda_error_text(int code) {
  const auto e = static_cast<cudaError_t>(code);
  return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
}

int device_count(std::string* why) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e == cudaSuccess) {
    if (count == 0 && why != nullptr) *why = "no CUDA device found";
    return count;
  }
  cudaGetLastError();  // clear the sticky-free error so later calls start clean
  if (why != nullptr) {
    int driver = 0, runtime = 0;
    cudaDriverGetVersion(&driver);
    cudaRuntimeGetVersion(&runtime);
    if (driver == 0 || e == cudaErrorNoDevice) {
      *why = "no NVIDIA driver or CUDA device found";
    } else if (e == cudaErrorInsufficientDriver) {
      *why = "the NVIDIA driver (CUDA " + std::to_string(driver / 1000) + "." + std::to_string(driver % 1000 / 10) +
             ") is older than this build needs (CUDA " + std::to_string(runtime / 1000) + "." +
             std::to_string(runtime % 1000 / 10) + "): update the driver, or use the CPU path";
    } else {
      *why = "CUDA is not usable: " + cuda_error_text(static_cast<int>(e));
    }
  }
  return 0;
}

int device_props(int device, std::string* name, int* major, int* minor, int* sms, int64_t* total_mem,
                 int* l2_bytes) {
  cudaDeviceProp p{};
  if (cudaError_t e = cudaGetDeviceProperties(&p, device); e != cudaSuccess) return static_cast<int>(e);
  *name = p.name;
  *major = p.major;
  *minor = p.minor;
  *sms = p.multiProcessorCount;
  *total_mem = static_cast<int64_t>(p.totalGlobalMem);
  *l2_bytes = p.l2CacheSize;
  return kOk;
}

}  // namespace cuda
}  // namespace qm
