// CPU kernels of blockwise 4-bit quantization (NF4 / FP4), nested absmax quantization and their
// inverses. The exactness rules are design.md's; formats/reference.py is the same thing in numpy.
//
// Layout (bitsandbytes' serialized Linear4bit layout):
//   x       [n] f32 / f16 / bf16, the flattened weight (C order)
//   packed  [(n+1)/2] u8, two codes per byte, the first element in the HIGH nibble, odd tail padded
//           with the code of 0.0 (NF4 7, FP4 0)
//   absmax  [nb] f32, nb = ceil(n / blocksize), the unclamped max|x| of each block
// All sizes and indices are 64-bit. Every entry point splits its work over the thread pool
// (threads <= 0: one per CPU of the affinity mask) and gives the same bytes for any thread count and ISA.
#pragma once

#include <cstdint>

#include "codebooks.h"
#include "cpu_features.h"

namespace qm {

// Quantizes n elements to 4-bit codes. Per block: absmax = max|x|; inv = 1.0f / max(absmax, 1e-38f)
// (IEEE division, once per block); s = x * inv; NF4 code = number of thresholds strictly below s;
// FP4 = bnb's CUDA tree on |s| plus the sign bit for s < 0. Returns the number of blocks holding a
// NaN or Inf (their codes and absmax are unspecified; the caller raises). isa Scalar is the
// reference path; AVX2 / AVX512 give the same bytes.
int64_t quantize_4bit(const void* x, DType dtype, int64_t n, int64_t blocksize, QuantType quant_type,
                      uint8_t* packed, float* absmax, Isa isa, int threads);

// Nested (double) quantization of nb absmax values, blocksize 256, bnb's signed dynamic 8-bit map.
//   offset = float32(S / nb), S the float64 sum: sequential within chunks of 1024, then over chunk sums
//   centered = absmax - offset; nested_absmax[j] = max|centered| over 256-block j
//   code = number of the 255 map midpoints strictly below centered * (1 / max(nested_absmax, 1e-38f))
// codes [nb] u8, nested_absmax [ceil(nb/256)] f32. Returns the offset (nb == 0 gives 0), or NaN when
// absmax holds a NaN or Inf (then codes and nested_absmax are not written).
// isa: Scalar (std::lower_bound, the reference) or a SIMD path; AVX2 runs the scalar code.
float quantize_nested(const float* absmax, int64_t nb, uint8_t* codes, float* nested_absmax, Isa isa,
                      int threads);

// absmax[i] = map8[codes[i]] * nested_absmax[i / 256], then + offset (a separate f32 multiply and add).
void dequantize_nested(const uint8_t* codes, int64_t nb, const float* nested_absmax, float offset,
                       const float* map8, float* absmax, int threads);

// out[k] = quant_map[q[k]] * absmax[k / blocksize] in f32, then a round-to-nearest-even cast to
// out_dtype. quant_map is the 16-entry table stored with the tensor; absmax is already un-nested.
void dequantize_4bit(const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize,
                     const float* quant_map, void* out, DType out_dtype, Isa isa, int threads);

}  // namespace qm
