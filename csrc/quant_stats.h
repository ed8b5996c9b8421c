// Error statistics of a blockwise 4-bit quantization against its input (quantization_report.json).
//
// One pass over x and the codes just written: v[k] = quant_map[q[k]] * absmax[k / blocksize] in f32
// (the value dequantize_4bit gives), e = x - v. Per block the sums run in f32 over 8 lanes (at most
// 512 terms per lane: relative error <= 512 u), then in float64 over blocks; fixed groups of blocks
// keep the result independent of the thread count. The caller passes the absmax a loader decodes
// (nested absmax already dequantized), so the statistics describe what is stored.
#pragma once

#include <cstdint>

#include "cpu_features.h"

namespace qm {

struct QuantErrorStats {
  double sum_x2 = 0.0;     // sum of x^2
  double sum_e2 = 0.0;     // sum of (x - v)^2
  double max_abs_e = 0.0;  // max |x - v|
  int64_t nonfinite = 0;   // elements of x or v that are NaN or Inf
};

QuantErrorStats quant_error_stats(const void* x, DType dtype, int64_t n, int64_t blocksize, const uint8_t* packed,
                                  const float* absmax, const float* quant_map, Isa isa, int threads);

// The same statistics of LLM.int8 codes against x [rows, cols]: v = f32(f32(codes * SCB[row]) * f32(1/127)),
// the weight bitsandbytes' loaders compute; a v that is not finite (a row stored with SCB = inf) counts
// its x as the error (the row is lost) and as non-finite, as does a non-finite x. Sums in float64 per
// row (exact squares of f32 values), rows added in order: the same result for any thread count; a NaN
// error makes max_abs_e NaN.
QuantErrorStats int8_error_stats(const void* x, DType dtype, int64_t rows, int64_t cols, const int8_t* codes,
                                 const float* scb, int threads);

// Number of NaN / Inf elements of x (kept tensors of the report).
int64_t count_nonfinite(const void* x, DType dtype, int64_t n, int threads);

}  // namespace qm
