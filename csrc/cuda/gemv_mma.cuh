// Tensor-core 4-bit GEMV for 16-bit activations (csrc/cuda/gemv_mma.cu), called by gemv.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace qm {
namespace cuda {

struct GemvMmaArgs {
  const void* x;          // [B, K] fp16 or bf16, 16-byte aligned
  const uint8_t* packed;  // [N*K/2], 16-byte aligned
  const float* absmax;    // [nb] (non-nested), 16-byte aligned
  const uint8_t* nc;      // [nb] nested codes, 16-byte aligned (nested; nullptr otherwise)
  const float* na;        // [ceil(nb/256)] nested absmax
  float offset;
  const float* map8;      // [256]
  const float* qm;        // [16]
  void* y;                // [B, N]
  int batch;
  int64_t N, K;  // K % blocksize == 0
  int log2bs;
  cudaStream_t st;
};

// Whether the tensor-core kernel can run these arguments on `device`: 16-bit x, whole blocks per row
// (K % blocksize == 0, as bitsandbytes' own GEMV requires), 16-byte aligned x, packed, absmax and
// nested codes (0 for the one not given), and a device that grants its ~105 KB of shared memory.
bool gemv_mma_supported(int device, int dtype, int64_t K, int blocksize, uintptr_t x, uintptr_t packed,
                        uintptr_t absmax, uintptr_t ncodes);

// split: warps sharing one 16-row tile (1, 2, 4 or 8); 0 picks by shape.
cudaError_t launch_gemv_mma(const GemvMmaArgs& a, int dtype, int split);

}  // namespace cuda
}  // namespace qm
