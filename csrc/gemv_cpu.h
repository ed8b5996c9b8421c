// Fused 4-bit GEMV / small-batch GEMM for the loader: y[b, o] = sum_k x[b, k] * W[o, k].
//
// Not a byte-exact path: each weight is decoded to the f32 product quant_map[q] * absmax that
// dequantize_4bit computes, then x * w is accumulated in float32 (FMA on the SIMD paths, in an order
// that differs from torch's). Tested against dequantize + matmul within the dtype's rounding. The
// AVX512BF16 path with bfloat16 x rounds code values to bfloat16 first, and the AVX2 path with 16-bit x
// multiplies code values and x as 15-bit integers (gemv_cpu.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

#include "cpu_features.h"

namespace qm {

constexpr int64_t kGemvMaxBatch = 8;

struct Gemv4bitArgs {
  const void* x;              // [batch, in_features] in x_dtype, row-major
  DType x_dtype;              // also the dtype of y
  int64_t batch;              // 1..kGemvMaxBatch
  int64_t in_features;        // K; a multiple of blocksize (a block never crosses a row)
  int64_t out_features;       // O
  int64_t blocksize;          // 32..4096, power of two
  const uint8_t* packed;      // [O * K / 2] u8, row o at byte o*K/2, first element in the high nibble
  const float* quant_map;     // [16] f32, the table stored with the weight
  const float* absmax;        // [O * K / blocksize] f32; null when nested
  const uint8_t* absmax_codes;  // nested: [O * K / blocksize] u8 codes into map8
  const float* nested_absmax;   // nested: [ceil(nb / 256)] f32
  float offset;                 // nested: absmax = map8[c] * nested_absmax[i / 256] + offset
  const float* map8;            // nested: [256] f32
  void* y;                    // [batch, out_features] in x_dtype
};

void gemv_4bit(const Gemv4bitArgs& args, Isa isa, int threads);

// Several weights that read the same x (q/k/v, gate/up) in one pool launch: each segment's y equals
// gemv_4bit of that segment bit for bit (x widened once; rows split at multiples of 16 of each weight,
// so every row takes the same tile path as in gemv_4bit). Segments must share x, x_dtype, batch,
// in_features and blocksize.
void gemv_4bit_multi(const std::vector<Gemv4bitArgs>& segments, Isa isa, int threads);

// Pieces of gemv_4bit for callers that run many weights in one pool launch (gemv_grouped.cpp).
// isa must be resolved with resolve_isa_full (the GEMV has an AVX512BF16 path); args must pass
// gemv_4bit's checks. x is prepared once (per x row) and read by the row kernels of every weight with
// the same x dtype, batch, in_features and blocksize.
// Cache-line aligned storage for x: every 64-byte vector load of it then reads one line, not two (an
// unaligned buffer split every load of x across lines, and which buffers did varied run to run).
template <class T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <class U>
  CacheLineAllocator(const CacheLineAllocator<U>&) noexcept {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64})); }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t{64}); }
  template <class U>
  bool operator==(const CacheLineAllocator<U>&) const noexcept { return true; }
  template <class U>
  bool operator!=(const CacheLineAllocator<U>&) const noexcept { return false; }
};

struct GemvX {
  enum class Path { F32, Bf16Dot, I16 };
  Path path = Path::F32;                                    // which of the buffers below gemv_rows reads
  std::vector<float, CacheLineAllocator<float>> f32;        // widened and permuted (the exact paths)
  std::vector<uint16_t, CacheLineAllocator<uint16_t>> bf16;  // bfloat16, permuted and zero padded (AVX512BF16)
  std::vector<int16_t, CacheLineAllocator<int16_t>> i16;     // AVX2, 16-bit x: 15-bit integers per 64-chunk
  std::vector<float> i16_step;                               // [batch][K / 64]: each chunk's max|x| / 16383
};
void gemv_prepare_x(const Gemv4bitArgs& args, Isa isa, GemvX& x);
void gemv_rows(const Gemv4bitArgs& args, const GemvX& x, int64_t o0, int64_t o1, Isa isa);

}  // namespace qm
