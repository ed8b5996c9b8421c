// Grouped 4-bit GEMV for MoE experts: G rows of x, each multiplied by the weight of its own expert,
// all in one thread-pool launch (decode runs the routed top-k experts of a layer in one call per
// projection). Same arithmetic as gemv_4bit (gemv_cpu.h) row by row.
#pragma once

#include <cstdint>

#include "cpu_features.h"

namespace qm {

struct GemvGroupedArgs {
  const void* x;            // [groups, in_features] in x_dtype (x_stride 0: one row shared by all groups)
  int64_t x_stride;         // elements between the x rows of consecutive groups (0 or in_features)
  DType x_dtype;            // also the dtype of y
  int64_t groups;           // G >= 1
  int64_t in_features;      // K, a multiple of blocksize
  int64_t out_features;     // O
  int64_t blocksize;
  const int64_t* ids;       // [G] expert of each group, 0 <= id < experts
  int64_t experts;
  const uint8_t* packed;    // expert e's codes at packed + e * packed_stride ([O * K / 2] bytes)
  int64_t packed_stride;
  const float* absmax;      // expert e's absmax at absmax + e * absmax_stride ([O * K / blocksize] f32)
  int64_t absmax_stride;
  const float* quant_map;   // [16] f32, shared by every expert
  void* y;                  // [G, out_features] in x_dtype
};

void gemv_4bit_grouped(const GemvGroupedArgs& args, Isa isa, int threads);

}  // namespace qm
