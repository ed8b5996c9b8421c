// Dense GEMV / small-batch GEMM of a bfloat16 weight: y[b, o] = sum_k x[b, k] * W[o, k].
//
// For the plain (not quantized) lm_head of decode: at batch 1 torch's bf16 matmul on CPU reads the
// weight at about a third of the memory bandwidth (SmolLM2-135M's 49152 x 576 head: 6.7 ms on one
// core of the dev VM against 2.5 ms to stream the same bytes), and the head is half of the bytes a
// 4-bit model reads per token. Weights widen to float32 exactly (a bf16 is the top half of an f32),
// products and sums are float32 (FMA on the SIMD paths, float64 on the scalar one), one rounding to
// x's dtype at the end: within gamma_K of the exact dot product, like any float32-accumulating BLAS.
#pragma once

#include <cstdint>

#include "cpu_features.h"

namespace qm {

constexpr int64_t kGemvBf16MaxBatch = 8;

struct GemvBf16Args {
  const void* x;          // [batch, in_features] in x_dtype, row-major
  DType x_dtype;          // also the dtype of y
  int64_t batch;          // 1..kGemvBf16MaxBatch
  int64_t in_features;    // K >= 1 (any; the SIMD paths take a scalar tail)
  int64_t out_features;   // O
  const uint16_t* w;      // [O, K] bfloat16 bits, row-major
  void* y;                // [batch, out_features] in x_dtype
};

void gemv_bf16(const GemvBf16Args& args, Isa isa, int threads);

}  // namespace qm
