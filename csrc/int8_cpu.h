// CPU kernels of LLM.int8 row-wise (vector-wise) 8-bit quantization, bitsandbytes' 8-bit format, its
// inverse and a fused int8 GEMV for the loader. The exactness rules are bnb-int8.md §4 (reference
// beside the repo); formats/int8.py states them in numpy.
//
// Layout (bitsandbytes' serialized Linear8bitLt, weight_format 0 = "row"):
//   x      [rows, cols] f32 / f16 / bf16, row-major (rows = out_features)
//   codes  [rows, cols] i8 in [-127, 127]
//   scb    [rows] f32, SCB[i] = max_j |fp16(x_ij)| (an fp16 value widened exactly)
// Every entry point splits rows over the thread pool and gives the same bytes for any thread count
// and ISA (the GEMV excepted: it only promises float32 accumulation, see gemv_int8).
#pragma once

#include <cstdint>

#include "cpu_features.h"

namespace qm {

// f32(1/127), the constant bnb's int8_vectorwise_dequant multiplies by (0x3C010204).
constexpr uint32_t kInv127Bits = 0x3C010204u;
// Entries of a scale table: one per non-negative finite fp16 bit pattern 0x0000..0x7c00 (inclusive).
constexpr int64_t kInt8ScaleTableSize = 0x7c01;

// Per row i: h = fp16_rne(x_i) (exact for f16 input), SCB[i] = max|h|,
//   s = scale_table ? scale_table[fp16 bits of SCB[i]] : f32(f32(1.0f / SCB[i]) * 127.0f)
//   codes[i, j] = round_half_even(f32(h_j * s)) as int8; a NaN product gives 0
// so a row with SCB 0 (all zeros) or +inf (a value past fp16's range) is all zeros, as bnb writes it.
// scale_table (kInt8ScaleTableSize f32) reproduces checkpoints made on CUDA (bnb's __fdividef
// scale); null is bnb's CPU path. Returns the number of rows holding a NaN or Inf in x (their codes
// and SCB are unspecified; the caller raises). isa Scalar is the reference; AVX2 / AVX512 give the
// same bytes.
int64_t quantize_int8(const void* x, DType dtype, int64_t rows, int64_t cols, int8_t* codes, float* scb,
                      const float* scale_table, Isa isa, int threads);

// out[i, j] = f32(f32(codes[i, j] * SCB[i]) * f32(1/127)), then a round-to-nearest-even cast to
// out_dtype (bnb's int8_vectorwise_dequant followed by .to(dtype)).
void dequantize_int8(const int8_t* codes, const float* scb, int64_t rows, int64_t cols, void* out,
                     DType out_dtype, Isa isa, int threads);

constexpr int64_t kGemvInt8MaxBatch = 8;

// y[b, o] = (sum_k x[b, k] * codes[o, k]) * f32(SCB[o] * f32(1/127)) for batch 1..8, x and y in
// x_dtype. Not byte-exact: the sum runs in float32 (FMA on the SIMD paths, the scalar reference in
// float64) in an order that differs from torch's; tested against dequantize + F.linear within the
// rounding of float32 accumulation and of the output dtype.
void gemv_int8(const void* x, DType x_dtype, int64_t batch, int64_t in_features, int64_t out_features,
               const int8_t* codes, const float* scb, void* y, Isa isa, int threads);

}  // namespace qm
