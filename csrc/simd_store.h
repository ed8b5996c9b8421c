// AVX2 loads and stores of 8 float32 lanes from / into a float32 / float16 / bfloat16 buffer: loads
// exact (float_convert.h's load_elem), stores round to nearest even (its store_elem). Shared by the
// 4-bit and int8 kernels.
#pragma once

#include <cstdint>

#include "float_convert.h"

#if QM_X86
#include <immintrin.h>

namespace qm {

// Round-to-nearest-even f32 -> bf16 of 8 lanes (NaN quieted), as 8 u16 in a __m128i.
QM_TARGET_AVX2 inline __m128i f32_to_bf16_avx2(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0b1000);
  return _mm256_castsi256_si128(packed);
}

// Elements i..i+7 as float32, exactly: bfloat16 by a shift into the high half, float16 by F16C.
template <DType DT>
QM_TARGET_AVX2 inline __m256 load8_avx2(const void* p, int64_t i) {
  if constexpr (DT == DType::F32) return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
  if constexpr (DT == DType::F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <DType DT>
QM_TARGET_AVX2 inline void store8_avx2(void* p, int64_t i, __m256 v) {
  if constexpr (DT == DType::F32) {
    _mm256_storeu_ps(static_cast<float*>(p) + i, v);
  } else {
    auto* dst = reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i);
    if constexpr (DT == DType::F16) {
      _mm_storeu_si128(dst, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    } else {
      _mm_storeu_si128(dst, f32_to_bf16_avx2(v));
    }
  }
}

}  // namespace qm
#endif  // QM_X86
