// Fused LLM.int8 GEMV on CUDA (csrc/cuda/gemv_int8.cu): host entry point. Plain C++, no CUDA types;
// pointers, stream and return codes follow qm_cuda.h's conventions.
#pragma once

#include <cstdint>

namespace qm {
namespace cuda {

// y[b, o] = T( sum_k x[b, k] * codes[o, k] * f32(SCB[o] * f32(1/127)) ) for b < batch (1..8), the sum
// in float32, x / y / bias of one dtype T (float32, float16, bfloat16). With bias (non-zero pointer,
// [N] in T) the result is then T( y + bias ): the bits of the CPU GEMV (csrc/int8_cpu.h gemv_int8)
// followed by torch's `y + bias`. codes int8 [N, K] row-major, scb float32 [N]. variant 0 picks the
// kernel configuration; 1..4 force one for batch 1-2 (benchmarks; every variant computes the same).
int gemv_int8(int device, uintptr_t x, int dtype, int batch, int64_t N, int64_t K, uintptr_t codes,
              uintptr_t scb, uintptr_t bias, uintptr_t y, uintptr_t stream, int variant = 0);

}  // namespace cuda
}  // namespace qm
