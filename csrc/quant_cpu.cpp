// Blockwise 4-bit quantize / dequantize and nested absmax quantization on the CPU.
//
// Each kernel has a scalar path (plain loops, the definition: *_scalar) and AVX2 / AVX-512 paths
// compiled with target attributes and picked at run time (Isa). The SIMD paths compute the same values
// per element (the block max is order-free, taken on the integer bits of |x|; the reciprocal is one
// scalar IEEE division per block; s = x * inv is one rounding; codes come from an exact search over
// strictly increasing thresholds), so they are byte-identical to the scalar path for finite input;
// tests assert it for every path this CPU runs.
#include "quant_cpu.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "float_convert.h"
#include "memory_hint.h"
#include "simd_store.h"
#include "thread_pool.h"

#if QM_X86
#include <immintrin.h>
#endif

namespace qm {

namespace {

// Elements per pool chunk: big enough to amortize the hand-out, small enough to balance 2+ cores.
constexpr int64_t kChunkElements = 1 << 15;
// How far ahead of the current block the quantize kernels prefetch their input.
constexpr int64_t kPrefetchBytes = 4096;

// ---------------------------------------------------------------------------------------------
// Scalar reference

inline uint8_t encode_nf4(float s) {
  int c = 0;
  for (int k = 0; k < 15; ++k) c += s > kNF4Thresholds[k];  // strict: ties go to the lower code
  return static_cast<uint8_t>(c);
}

inline uint8_t encode_fp4(float s) {
  const float a = std::fabs(s);
  int k = 0;
  for (int t = 0; t < 7; ++t) k += a > kFP4Thresholds[t];
  return static_cast<uint8_t>(kFP4TreeCodes[k] | (s < 0.0f ? kFP4SignBit : 0));  // -0.0 is not < 0
}

template <QuantType QT>
inline uint8_t encode(float s) {
  return QT == QuantType::NF4 ? encode_nf4(s) : encode_fp4(s);
}

template <QuantType QT>
constexpr uint8_t zero_code() {
  return QT == QuantType::NF4 ? kNF4ZeroCode : kFP4ZeroCode;
}

// Quantizes blocks [b0, b1). Returns how many of them hold a NaN or Inf.
template <DType DT, QuantType QT>
int64_t quantize_blocks_scalar(const void* x, int64_t n, int64_t bs, int64_t b0, int64_t b1,
                               uint8_t* packed, float* absmax) {
  int64_t bad_blocks = 0;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t lo = b * bs, hi = std::min(n, lo + bs);
    float am = 0.0f;
    bool bad = false;
    for (int64_t i = lo; i < hi; ++i) {
      const float a = std::fabs(load_elem<DT>(x, i));
      bad |= !(a <= FLT_MAX);  // NaN or Inf
      am = a > am ? a : am;
    }
    absmax[b] = am;
    bad_blocks += bad;
    const float inv = 1.0f / std::max(am, kTiny);
    for (int64_t i = lo; i < hi; i += 2) {  // lo is even: a byte never straddles two blocks
      const uint8_t c0 = encode<QT>(load_elem<DT>(x, i) * inv);
      const uint8_t c1 = i + 1 < hi ? encode<QT>(load_elem<DT>(x, i + 1) * inv) : zero_code<QT>();
      packed[i >> 1] = static_cast<uint8_t>(c0 << 4 | c1);
    }
  }
  return bad_blocks;
}

template <DType DT>
void dequantize_blocks_scalar(const uint8_t* packed, const float* absmax, int64_t n, int64_t bs, int64_t b0,
                              int64_t b1, const float* qm, void* out) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t lo = b * bs, hi = std::min(n, lo + bs);
    const float am = absmax[b];
    for (int64_t i = lo; i < hi; ++i) {
      const int q = (packed[i >> 1] >> ((i & 1) ? 0 : 4)) & 0xF;
      store_elem<DT>(out, i, qm[q] * am);
    }
  }
}

#if QM_X86
// Prefetches the block of bs elements kPrefetchBytes after element `next`. The two short passes per
// block leave the hardware prefetcher too little time when the input streams from memory (measured:
// 2.3 -> 3.6 Gparam/s per core on bf16). Prefetching past the end of the buffer is harmless.
template <DType DT>
inline void prefetch_block(const void* x, int64_t next, int64_t bs) {
  constexpr int64_t esize = DT == DType::F32 ? 4 : 2;
  const char* ahead = static_cast<const char*>(x) + next * esize + kPrefetchBytes;
  for (int64_t line = 0; line < bs * esize; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
}

// ---------------------------------------------------------------------------------------------
// AVX2 (+FMA +F16C). Full blocks only (blocksize is a multiple of 32); a partial last block takes
// the scalar path, which computes the same bits.

template <DType DT>
QM_TARGET_AVX2 inline __m256 load8_avx2(const void* p, int64_t i) {
  if constexpr (DT == DType::F32) {
    return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    if constexpr (DT == DType::F16) {
      return _mm256_cvtph_ps(h);  // exact widening
    } else {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }
}

// Thresholds of the AVX2 binary search, one register per level. NF4 (15 thresholds t0..t14):
// level 1 compares with t7, level 2 with t3 / t11, level 3 with t1, t5, t9, t13 (index idx/4),
// level 4 with the even thresholds t0, t2, ..., t14 (index idx/2). FP4 (7 thresholds): t3, then
// t1 / t5, then t0, t2, t4, t6. Strictly increasing thresholds make this exactly the count of
// thresholds strictly below s (NaN compares false everywhere and gets 0, as the count does).
struct SearchTables {
  __m256 l1, l2_lo, l2_hi, l3, l4;
};

template <QuantType QT>
QM_TARGET_AVX2 inline SearchTables search_tables_avx2() {
  if constexpr (QT == QuantType::NF4) {
    const float* t = kNF4Thresholds;
    return {_mm256_set1_ps(t[7]), _mm256_set1_ps(t[3]), _mm256_set1_ps(t[11]),
            _mm256_setr_ps(t[1], t[5], t[9], t[13], 0, 0, 0, 0),
            _mm256_setr_ps(t[0], t[2], t[4], t[6], t[8], t[10], t[12], t[14])};
  } else {
    const float* t = kFP4Thresholds;
    return {_mm256_set1_ps(t[3]), _mm256_set1_ps(t[1]), _mm256_set1_ps(t[5]),
            _mm256_setr_ps(t[0], t[2], t[4], t[6], 0, 0, 0, 0), _mm256_setzero_ps()};
  }
}

// Codes of 8 scaled values as int32 lanes.
template <QuantType QT>
QM_TARGET_AVX2 inline __m256i encode8_avx2(__m256 s, const SearchTables& t) {
  const __m256 v = QT == QuantType::NF4 ? s : _mm256_andnot_ps(_mm256_set1_ps(-0.0f), s);
  constexpr int top = QT == QuantType::NF4 ? 8 : 4;  // the first step
  // Level 1.
  __m256 gt = _mm256_cmp_ps(v, t.l1, _CMP_GT_OQ);
  __m256i idx = _mm256_and_si256(_mm256_castps_si256(gt), _mm256_set1_epi32(top));
  // Level 2: the threshold is l2_hi where level 1 went up, else l2_lo.
  gt = _mm256_cmp_ps(v, _mm256_blendv_ps(t.l2_lo, t.l2_hi, gt), _CMP_GT_OQ);
  idx = _mm256_add_epi32(idx, _mm256_and_si256(_mm256_castps_si256(gt), _mm256_set1_epi32(top / 2)));
  // Level 3: idx is a multiple of top/2; the candidate is l3[idx / (top/2)].
  const __m256 t3 = _mm256_permutevar8x32_ps(t.l3, _mm256_srli_epi32(idx, top == 8 ? 2 : 1));
  gt = _mm256_cmp_ps(v, t3, _CMP_GT_OQ);
  idx = _mm256_add_epi32(idx, _mm256_and_si256(_mm256_castps_si256(gt), _mm256_set1_epi32(top / 4)));
  if constexpr (QT == QuantType::NF4) {
    // Level 4: idx is even; the candidate is l4[idx / 2] = t[idx].
    const __m256 t4 = _mm256_permutevar8x32_ps(t.l4, _mm256_srli_epi32(idx, 1));
    idx = _mm256_sub_epi32(idx, _mm256_castps_si256(_mm256_cmp_ps(v, t4, _CMP_GT_OQ)));
    return idx;
  } else {
    const __m256i tree = _mm256_load_si256(reinterpret_cast<const __m256i*>(kFP4TreeCodes));
    const __m256i code = _mm256_permutevar8x32_epi32(tree, idx);
    const __m256i neg = _mm256_castps_si256(_mm256_cmp_ps(s, _mm256_setzero_ps(), _CMP_LT_OQ));
    return _mm256_or_si256(code, _mm256_and_si256(neg, _mm256_set1_epi32(kFP4SignBit)));
  }
}

// Block absmax from the integer bits (see block_absmax_avx512): exact, and Inf / NaN show in the max.
template <DType DT>
QM_TARGET_AVX2 inline float block_absmax_avx2(const void* p, int64_t lo, int64_t bs, bool* bad) {
  __m256i m = _mm256_setzero_si256();
  if constexpr (DT == DType::F32) {
    const auto* f = static_cast<const float*>(p);
    const __m256i mask = _mm256_set1_epi32(0x7fffffff);
    for (int64_t i = lo; i < lo + bs; i += 8) {
      m = _mm256_max_epu32(m, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(f + i)), mask));
    }
  } else {
    const auto* h = static_cast<const uint16_t*>(p);
    const __m256i mask = _mm256_set1_epi16(0x7fff);
    for (int64_t i = lo; i < lo + bs; i += 16) {
      m = _mm256_max_epu16(m, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i)), mask));
    }
    m = _mm256_max_epu32(_mm256_and_si256(m, _mm256_set1_epi32(0xffff)), _mm256_srli_epi32(m, 16));
  }
  __m128i r = _mm_max_epu32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
  r = _mm_max_epu32(r, _mm_shuffle_epi32(r, 0x4e));
  r = _mm_max_epu32(r, _mm_shuffle_epi32(r, 0xb1));
  const uint32_t bits = static_cast<uint32_t>(_mm_cvtsi128_si32(r));
  if constexpr (DT == DType::F32) {
    *bad = bits >= 0x7f800000u;
    return bits_f32(bits);
  } else if constexpr (DT == DType::BF16) {
    *bad = bits >= 0x7f80u;
    return bf16_to_f32(static_cast<uint16_t>(bits));
  } else {
    *bad = bits >= 0x7c00u;
    return f16_to_f32(static_cast<uint16_t>(bits));
  }
}

// Packs the codes of 32 consecutive elements (c_j holds elements 8j..8j+7) into 16 bytes, the first
// element of each pair in the high nibble.
QM_TARGET_AVX2 inline __m128i pack32_avx2(__m256i c0, __m256i c1, __m256i c2, __m256i c3) {
  const __m256i b = _mm256_packus_epi16(_mm256_packs_epi32(c0, c1), _mm256_packs_epi32(c2, c3));
  // b's dwords hold elements [0-3, 8-11, 16-19, 24-27 | 4-7, 12-15, 20-23, 28-31]: restore the order.
  const __m256i e = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  // 16-bit lane j = e[2j] | e[2j+1] << 8  ->  (e[2j] << 4) | e[2j+1] in its low byte.
  __m256i w = _mm256_or_si256(_mm256_slli_epi16(e, 4), _mm256_srli_epi16(e, 8));
  w = _mm256_and_si256(w, _mm256_set1_epi16(0x00ff));
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi16(w, w), 0b1000));
}

template <DType DT, QuantType QT>
QM_TARGET_AVX2 int64_t quantize_blocks_avx2(const void* x, int64_t n, int64_t bs, int64_t b0, int64_t b1,
                                            uint8_t* packed, float* absmax) {
  const SearchTables t = search_tables_avx2<QT>();
  int64_t bad_blocks = 0;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t lo = b * bs;
    if (lo + bs > n) {
      bad_blocks += quantize_blocks_scalar<DT, QT>(x, n, bs, b, b + 1, packed, absmax);
      continue;
    }
    prefetch_block<DT>(x, lo + bs, bs);
    bool bad = false;
    const float am = block_absmax_avx2<DT>(x, lo, bs, &bad);
    absmax[b] = am;
    bad_blocks += bad;
    const __m256 inv = _mm256_set1_ps(1.0f / std::max(am, kTiny));
    for (int64_t i = lo; i < lo + bs; i += 32) {
      const __m256i c0 = encode8_avx2<QT>(_mm256_mul_ps(load8_avx2<DT>(x, i), inv), t);
      const __m256i c1 = encode8_avx2<QT>(_mm256_mul_ps(load8_avx2<DT>(x, i + 8), inv), t);
      const __m256i c2 = encode8_avx2<QT>(_mm256_mul_ps(load8_avx2<DT>(x, i + 16), inv), t);
      const __m256i c3 = encode8_avx2<QT>(_mm256_mul_ps(load8_avx2<DT>(x, i + 24), inv), t);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(packed + (i >> 1)), pack32_avx2(c0, c1, c2, c3));
    }
  }
  return bad_blocks;
}

// 16-entry table lookup with 8-lane permutes: bit 3 of the index picks the half (via the sign bit).
QM_TARGET_AVX2 inline __m256 lookup16_avx2(__m256i idx, __m256 lo, __m256 hi) {
  const __m256 from_lo = _mm256_permutevar8x32_ps(lo, idx);
  const __m256 from_hi = _mm256_permutevar8x32_ps(hi, idx);
  return _mm256_blendv_ps(from_lo, from_hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// The codes of 32 elements from 16 packed bytes, in element order: (elements 0..15, 16..31).
QM_TARGET_AVX2 inline void unpack32(const uint8_t* p, __m128i* first, __m128i* second) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i nib = _mm_set1_epi8(0x0f);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nib);
  const __m128i lo = _mm_and_si128(bytes, nib);
  *first = _mm_unpacklo_epi8(hi, lo);
  *second = _mm_unpackhi_epi8(hi, lo);
}

template <DType DT>
QM_TARGET_AVX2 void dequantize_blocks_avx2(const uint8_t* packed, const float* absmax, int64_t n, int64_t bs,
                                           int64_t b0, int64_t b1, const float* qm, void* out) {
  const __m256 qm_lo = _mm256_loadu_ps(qm), qm_hi = _mm256_loadu_ps(qm + 8);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t lo = b * bs;
    if (lo + bs > n) {
      dequantize_blocks_scalar<DT>(packed, absmax, n, bs, b, b + 1, qm, out);
      continue;
    }
    const __m256 am = _mm256_set1_ps(absmax[b]);
    for (int64_t i = lo; i < lo + bs; i += 32) {
      __m128i c[2];
      unpack32(packed + (i >> 1), &c[0], &c[1]);
      for (int h = 0; h < 2; ++h) {
        const __m256i i0 = _mm256_cvtepu8_epi32(c[h]);
        const __m256i i1 = _mm256_cvtepu8_epi32(_mm_srli_si128(c[h], 8));
        store8_avx2<DT>(out, i + 16 * h, _mm256_mul_ps(lookup16_avx2(i0, qm_lo, qm_hi), am));
        store8_avx2<DT>(out, i + 16 * h + 8, _mm256_mul_ps(lookup16_avx2(i1, qm_lo, qm_hi), am));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// AVX-512 (F, BW, VL, DQ). Same structure; the 16-entry tables fit one register, so NF4 codes come
// from a 4-step branchless binary search over the thresholds (exactly the count of thresholds
// strictly below s: the thresholds increase strictly) and decoding is one vpermps.

template <DType DT>
QM_TARGET_AVX512 inline void store16_avx512(void* p, int64_t i, __m512 v) {
  if constexpr (DT == DType::F32) {
    _mm512_storeu_ps(static_cast<float*>(p) + i, v);
  } else {
    auto* dst = reinterpret_cast<__m256i*>(static_cast<uint16_t*>(p) + i);
    if constexpr (DT == DType::F16) {
      _mm256_storeu_si256(dst, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    } else {
      const __m512i u = _mm512_castps_si512(v);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
      const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
      _mm256_storeu_si256(dst, _mm512_cvtepi32_epi16(r));
    }
  }
}

// Count of table entries strictly below s for a strictly increasing table of 2^levels - 1 entries
// held in `table` (padded with +inf): a branchless lower_bound.
template <int Levels>
QM_TARGET_AVX512 inline __m512i count_below_avx512(__m512 s, __m512 table) {
  __m512i idx = _mm512_setzero_si512();
  for (int step = 1 << (Levels - 1); step > 0; step >>= 1) {
    const __m512 t = _mm512_permutexvar_ps(_mm512_add_epi32(idx, _mm512_set1_epi32(step - 1)), table);
    const __mmask16 gt = _mm512_cmp_ps_mask(s, t, _CMP_GT_OQ);
    idx = _mm512_mask_add_epi32(idx, gt, idx, _mm512_set1_epi32(step));
  }
  return idx;
}

template <QuantType QT>
QM_TARGET_AVX512 inline __m512i encode16_avx512(__m512 s, __m512 table, __m512i tree) {
  if constexpr (QT == QuantType::NF4) {
    return count_below_avx512<4>(s, table);
  } else {
    const __m512i k = count_below_avx512<3>(_mm512_abs_ps(s), table);
    const __m512i code = _mm512_permutexvar_epi32(k, tree);
    const __mmask16 neg = _mm512_cmp_ps_mask(s, _mm512_setzero_ps(), _CMP_LT_OQ);
    return _mm512_mask_or_epi32(code, neg, code, _mm512_set1_epi32(kFP4SignBit));
  }
}

// The 32 elements at x[i..i+31] as float32, split into even (x[i], x[i+2], ...) and odd elements.
// The even element of a pair goes to the high nibble and the odd one to the low nibble of the same
// byte, so lane j of the two code vectors makes byte j: no shuffling of codes afterwards.
template <DType DT>
QM_TARGET_AVX512 inline void load32_even_odd_avx512(const void* p, int64_t i, __m512* even, __m512* odd) {
  if constexpr (DT == DType::BF16) {
    // Each 32-bit lane holds (odd << 16) | even: the bf16 bits are the top halves of the f32.
    const __m512i v = _mm512_loadu_si512(static_cast<const uint16_t*>(p) + i);
    *even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    *odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  } else if constexpr (DT == DType::F16) {
    const __m512i v = _mm512_loadu_si512(static_cast<const uint16_t*>(p) + i);
    *even = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v));
    *odd = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(v, 16)));
  } else {
    const float* f = static_cast<const float*>(p) + i;
    const __m512 a = _mm512_loadu_ps(f), b = _mm512_loadu_ps(f + 16);
    const __m512i even_idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    *even = _mm512_permutex2var_ps(a, even_idx, b);
    *odd = _mm512_permutex2var_ps(a, _mm512_add_epi32(even_idx, _mm512_set1_epi32(1)), b);
  }
}

// Block absmax from the integer bits: for finite values |x| orders like its bit pattern, so an
// unsigned integer max of the sign-cleared bits is the float max (exact, and cheaper than float
// compares). Inf and NaN have the largest patterns, so they show in the max: *bad is set then.
template <DType DT>
QM_TARGET_AVX512 inline float block_absmax_avx512(const void* p, int64_t lo, int64_t bs, bool* bad) {
  if constexpr (DT == DType::F32) {
    const float* f = static_cast<const float*>(p);
    const __m512i mask = _mm512_set1_epi32(0x7fffffff);
    __m512i m = _mm512_setzero_si512();
    for (int64_t i = lo; i < lo + bs; i += 16) m = _mm512_max_epu32(m, _mm512_and_si512(_mm512_loadu_si512(f + i), mask));
    const uint32_t bits = _mm512_reduce_max_epu32(m);
    *bad = bits >= 0x7f800000u;
    return bits_f32(bits);
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(p);
    const __m512i mask = _mm512_set1_epi16(0x7fff);
    __m512i m = _mm512_setzero_si512();
    for (int64_t i = lo; i < lo + bs; i += 32) m = _mm512_max_epu16(m, _mm512_and_si512(_mm512_loadu_si512(h + i), mask));
    // Fold the two 16-bit halves of each lane, then reduce the 16 lanes.
    m = _mm512_max_epu32(_mm512_and_si512(m, _mm512_set1_epi32(0xffff)), _mm512_srli_epi32(m, 16));
    const uint16_t bits = static_cast<uint16_t>(_mm512_reduce_max_epu32(m));
    if constexpr (DT == DType::BF16) {
      *bad = bits >= 0x7f80u;
      return bf16_to_f32(bits);
    } else {
      *bad = bits >= 0x7c00u;
      return f16_to_f32(bits);
    }
  }
}

template <DType DT, QuantType QT>
QM_TARGET_AVX512 int64_t quantize_blocks_avx512(const void* x, int64_t n, int64_t bs, int64_t b0, int64_t b1,
                                                uint8_t* packed, float* absmax) {
  alignas(64) float tab[16];
  const float inf = INFINITY;
  if constexpr (QT == QuantType::NF4) {
    for (int k = 0; k < 15; ++k) tab[k] = kNF4Thresholds[k];
    tab[15] = inf;
  } else {
    for (int k = 0; k < 16; ++k) tab[k] = k < 7 ? kFP4Thresholds[k] : inf;
  }
  alignas(64) int32_t tree16[16];
  for (int k = 0; k < 16; ++k) tree16[k] = kFP4TreeCodes[k & 7];
  const __m512 table = _mm512_load_ps(tab);
  const __m512i tree = _mm512_load_si512(tree16);
  // Large outputs bypass the cache (no read-for-ownership of lines we overwrite whole); stream
  // stores need 16-byte alignment, which torch's allocations give.
  const bool stream = n >= (int64_t{1} << 24) && (reinterpret_cast<uintptr_t>(packed) & 15) == 0;
  int64_t bad_blocks = 0;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t lo = b * bs;
    if (lo + bs > n) {
      bad_blocks += quantize_blocks_scalar<DT, QT>(x, n, bs, b, b + 1, packed, absmax);
      continue;
    }
    prefetch_block<DT>(x, lo + bs, bs);
    bool bad = false;
    const float am = block_absmax_avx512<DT>(x, lo, bs, &bad);
    absmax[b] = am;
    bad_blocks += bad;
    const __m512 inv = _mm512_set1_ps(1.0f / std::max(am, kTiny));
    for (int64_t i = lo; i < lo + bs; i += 32) {
      __m512 even, odd;
      load32_even_odd_avx512<DT>(x, i, &even, &odd);
      const __m512i hi = encode16_avx512<QT>(_mm512_mul_ps(even, inv), table, tree);
      const __m512i lo_nib = encode16_avx512<QT>(_mm512_mul_ps(odd, inv), table, tree);
      const __m512i bytes = _mm512_or_si512(_mm512_slli_epi32(hi, 4), lo_nib);
      auto* dst = reinterpret_cast<__m128i*>(packed + (i >> 1));
      if (stream) {
        _mm_stream_si128(dst, _mm512_cvtepi32_epi8(bytes));
      } else {
        _mm_storeu_si128(dst, _mm512_cvtepi32_epi8(bytes));
      }
    }
  }
  if (stream) _mm_sfence();  // order the streamed bytes before the pool reports completion
  return bad_blocks;
}

template <DType DT>
QM_TARGET_AVX512 void dequantize_blocks_avx512(const uint8_t* packed, const float* absmax, int64_t n,
                                               int64_t bs, int64_t b0, int64_t b1, const float* qm, void* out) {
  const __m512 table = _mm512_loadu_ps(qm);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t lo = b * bs;
    if (lo + bs > n) {
      dequantize_blocks_scalar<DT>(packed, absmax, n, bs, b, b + 1, qm, out);
      continue;
    }
    const __m512 am = _mm512_set1_ps(absmax[b]);
    for (int64_t i = lo; i < lo + bs; i += 32) {
      __m128i c[2];
      unpack32(packed + (i >> 1), &c[0], &c[1]);
      store16_avx512<DT>(out, i, _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(c[0]), table), am));
      store16_avx512<DT>(out, i + 16,
                         _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(c[1]), table), am));
    }
  }
}

#endif  // QM_X86

// ---------------------------------------------------------------------------------------------
// Dispatch tables

using QuantizeFn = int64_t (*)(const void*, int64_t, int64_t, int64_t, int64_t, uint8_t*, float*);
using DequantizeFn = void (*)(const uint8_t*, const float*, int64_t, int64_t, int64_t, int64_t, const float*,
                              void*);

template <DType DT, QuantType QT>
QuantizeFn pick_quantize(Isa isa) {
  switch (isa) {
#if QM_X86
    case Isa::AVX512:
      return quantize_blocks_avx512<DT, QT>;
    case Isa::AVX2:
      return quantize_blocks_avx2<DT, QT>;
#endif
    default:
      return quantize_blocks_scalar<DT, QT>;
  }
}

template <QuantType QT>
QuantizeFn pick_quantize(DType dt, Isa isa) {
  switch (dt) {
    case DType::F32:
      return pick_quantize<DType::F32, QT>(isa);
    case DType::F16:
      return pick_quantize<DType::F16, QT>(isa);
    default:
      return pick_quantize<DType::BF16, QT>(isa);
  }
}

QuantizeFn pick_quantize(DType dt, QuantType qt, Isa isa) {
  return qt == QuantType::NF4 ? pick_quantize<QuantType::NF4>(dt, isa) : pick_quantize<QuantType::FP4>(dt, isa);
}

template <DType DT>
DequantizeFn pick_dequantize(Isa isa) {
  switch (isa) {
#if QM_X86
    case Isa::AVX512:
      return dequantize_blocks_avx512<DT>;
    case Isa::AVX2:
      return dequantize_blocks_avx2<DT>;
#endif
    default:
      return dequantize_blocks_scalar<DT>;
  }
}

DequantizeFn pick_dequantize(DType dt, Isa isa) {
  switch (dt) {
    case DType::F32:
      return pick_dequantize<DType::F32>(isa);
    case DType::F16:
      return pick_dequantize<DType::F16>(isa);
    default:
      return pick_dequantize<DType::BF16>(isa);
  }
}

void check_blocksize(int64_t bs) {
  // The SIMD paths step 32 elements at a time inside a block.
  if (bs < 32 || bs > 4096 || (bs & (bs - 1)) != 0) {
    throw std::invalid_argument("blocksize " + std::to_string(bs) +
                                " is not supported: expected a power of two in 32..4096");
  }
}

}  // namespace

int64_t quantize_4bit(const void* x, DType dtype, int64_t n, int64_t blocksize, QuantType quant_type,
                      uint8_t* packed, float* absmax, Isa isa, int threads) {
  check_blocksize(blocksize);
  const QuantizeFn fn = pick_quantize(dtype, quant_type, resolve_isa(isa));
  const int64_t nb = (n + blocksize - 1) / blocksize;
  advise_hugepages(packed, static_cast<size_t>((n + 1) / 2));
  std::atomic<int64_t> bad_blocks{0};
  parallel_for(nb, threads, std::max<int64_t>(1, kChunkElements / blocksize), [&](int64_t b0, int64_t b1) {
    const int64_t k = fn(x, n, blocksize, b0, b1, packed, absmax);
    if (k) bad_blocks.fetch_add(k, std::memory_order_relaxed);
  });
  return bad_blocks.load();
}

void dequantize_4bit(const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize,
                     const float* quant_map, void* out, DType out_dtype, Isa isa, int threads) {
  check_blocksize(blocksize);
  const DequantizeFn fn = pick_dequantize(out_dtype, resolve_isa(isa));
  const int64_t nb = (n + blocksize - 1) / blocksize;
  advise_hugepages(out, static_cast<size_t>(n * dtype_size(out_dtype)));
  parallel_for(nb, threads, std::max<int64_t>(1, kChunkElements / blocksize),
               [&](int64_t b0, int64_t b1) { fn(packed, absmax, n, blocksize, b0, b1, quant_map, out); });
}

namespace {

// Nested codes of one 256-block [lo, hi): max|absmax - offset|, one IEEE reciprocal, then the count
// of the 255 midpoints strictly below each v (std::lower_bound: the first midpoint >= v).
void nested_block_scalar(const float* absmax, int64_t lo, int64_t hi, float offset, uint8_t* codes, float* nested) {
  float m = 0.0f;
  for (int64_t i = lo; i < hi; ++i) {
    const float a = std::fabs(absmax[i] - offset);
    m = a > m ? a : m;
  }
  *nested = m;
  const float inv = 1.0f / std::max(m, kTiny);
  for (int64_t i = lo; i < hi; ++i) {
    const float v = (absmax[i] - offset) * inv;
    codes[i] = static_cast<uint8_t>(std::lower_bound(kDynamic8Midpoints, kDynamic8Midpoints + 255, v) -
                                    kDynamic8Midpoints);
  }
}

#if QM_X86
// The same with 16 lanes: an 8-step branchless binary search over the midpoints padded to 256 with
// +inf (gathers), which equals the count for the strictly increasing midpoints.
QM_TARGET_AVX512 void nested_block_avx512(const float* absmax, int64_t lo, int64_t hi, float offset,
                                          uint8_t* codes, float* nested) {
  alignas(64) static const auto padded = [] {
    std::array<float, 256> t{};
    for (int k = 0; k < 255; ++k) t[k] = kDynamic8Midpoints[k];
    t[255] = INFINITY;
    return t;
  }();
  const __m512 off = _mm512_set1_ps(offset);
  __m512 m = _mm512_setzero_ps();
  for (int64_t i = lo; i < hi; i += 16) {
    const __mmask16 valid = hi - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (hi - i)) - 1);
    const __m512 c = _mm512_sub_ps(_mm512_maskz_loadu_ps(valid, absmax + i), off);
    m = _mm512_mask_max_ps(m, valid, _mm512_abs_ps(c), m);
  }
  const float mx = _mm512_reduce_max_ps(m);
  *nested = mx;
  const __m512 inv = _mm512_set1_ps(1.0f / std::max(mx, kTiny));
  for (int64_t i = lo; i < hi; i += 16) {
    const __mmask16 valid = hi - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (hi - i)) - 1);
    const __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, absmax + i), off), inv);
    __m512i idx = _mm512_setzero_si512();
    for (int step = 128; step > 0; step >>= 1) {
      const __m512i probe = _mm512_add_epi32(idx, _mm512_set1_epi32(step - 1));
      const __m512 t = _mm512_i32gather_ps(probe, padded.data(), 4);
      idx = _mm512_mask_add_epi32(idx, _mm512_cmp_ps_mask(v, t, _CMP_GT_OQ), idx, _mm512_set1_epi32(step));
    }
    _mm512_mask_cvtepi32_storeu_epi8(codes + i, valid, idx);
  }
}

#endif  // QM_X86

}  // namespace

float quantize_nested(const float* absmax, int64_t nb, uint8_t* codes, float* nested_absmax, Isa isa,
                      int threads) {
  if (nb <= 0) return 0.0f;
  isa = resolve_isa(isa);
  // The float64 sum in its fixed order: sequential within chunks of 1024 (chunks in parallel), then
  // sequential over the chunk sums. No reassociation: -ffp-contract=off, no fast-math.
  const int64_t n_chunks = (nb + kOffsetChunk - 1) / kOffsetChunk;
  std::vector<double> sums(static_cast<size_t>(n_chunks));
  parallel_for(n_chunks, threads, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t hi = std::min(nb, (c + 1) * kOffsetChunk);
      double s = 0.0;
      for (int64_t i = c * kOffsetChunk; i < hi; ++i) s += static_cast<double>(absmax[i]);
      sums[static_cast<size_t>(c)] = s;
    }
  });
  double total = 0.0;
  for (const double s : sums) total += s;
  // A NaN or Inf absmax makes the float64 sum non-finite (finite float32 values cannot overflow it).
  if (!std::isfinite(total)) return std::numeric_limits<float>::quiet_NaN();
  const float offset = static_cast<float>(total / static_cast<double>(nb));

#if QM_X86
  const auto block = isa == Isa::AVX512 ? nested_block_avx512 : nested_block_scalar;
#else
  (void)isa;
  const auto block = nested_block_scalar;
#endif
  const int64_t n_nested = (nb + kNestedBlocksize - 1) / kNestedBlocksize;
  parallel_for(n_nested, threads, 64, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t lo = j * kNestedBlocksize, hi = std::min(nb, lo + kNestedBlocksize);
      block(absmax, lo, hi, offset, codes, nested_absmax + j);
    }
  });
  return offset;
}

void dequantize_nested(const uint8_t* codes, int64_t nb, const float* nested_absmax, float offset,
                       const float* map8, float* absmax, int threads) {
  parallel_for(nb, threads, kChunkElements, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float scaled = map8[codes[i]] * nested_absmax[i / kNestedBlocksize];
      absmax[i] = scaled + offset;  // a separate add (no FMA: -ffp-contract=off)
    }
  });
}

}  // namespace qm
