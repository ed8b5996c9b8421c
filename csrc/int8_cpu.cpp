// LLM.int8 row-wise quantize / dequantize and the fused int8 GEMV on the CPU.
//
// Each kernel has a scalar path (plain loops, the definition) and AVX2 / AVX-512 paths compiled with
// target attributes and picked at run time. Why the SIMD paths give the scalar bytes:
// - the row absmax is taken on the integer bits of |x| in the SOURCE dtype and rounded to fp16 once:
//   fp16 rounding is monotone, so max|fp16(x)| = fp16(max|x|) exactly;
// - h = fp16(x) uses vcvtps2ph with round-to-nearest-even (the bits of f32_to_f16);
// - s is one scalar value per row; h * s is one f32 rounding; the code rounds half to even
//   (explicit rounding immediates, never the MXCSR mode);
// - a row with SCB 0 or +inf is all zeros (the scalar formula's NaN -> 0), so no lane sees a NaN.
#include "int8_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
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

// Elements per pool chunk (rows are grouped until a chunk holds about this many).
constexpr int64_t kChunkElements = 1 << 15;

inline int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, kChunkElements / std::max<int64_t>(cols, 1)); }

// ---------------------------------------------------------------------------------------------
// Scalar reference

// |x| as integer bits of the source dtype (monotone in |x|; NaN / Inf at or above inf_bits).
template <DType DT>
inline uint32_t abs_bits(const void* p, int64_t i) {
  if constexpr (DT == DType::F32) {
    return f32_bits(static_cast<const float*>(p)[i]) & 0x7fffffffu;
  } else {
    return static_cast<const uint16_t*>(p)[i] & 0x7fffu;
  }
}

template <DType DT>
constexpr uint32_t inf_bits() {
  return DT == DType::F32 ? 0x7f800000u : (DT == DType::BF16 ? 0x7f80u : 0x7c00u);
}

template <DType DT>
inline float from_abs_bits(uint32_t b) {
  if constexpr (DT == DType::F32) {
    return bits_f32(b);
  } else if constexpr (DT == DType::BF16) {
    return bf16_to_f32(static_cast<uint16_t>(b));
  } else {
    return f16_to_f32(static_cast<uint16_t>(b));
  }
}

// fp16 round-to-nearest-even of a float32, widened back (exact; overflow gives inf).
inline float round_f16(float v) { return f16_to_f32(f32_to_f16(v)); }

// SCB of a row from the max of its |x| bits: the fp16 value of the source absmax.
template <DType DT>
inline float row_scb(uint32_t max_bits) {
  const float m = from_abs_bits<DT>(max_bits);
  return DT == DType::F16 ? m : round_f16(m);
}

// The per-row scale: bnb's CPU form (reciprocal, then * 127: two roundings) or a table entry.
inline float row_scale(float scb, const float* table) {
  if (table != nullptr) return table[f32_to_f16(scb)];
  const float r = 1.0f / scb;
  return r * 127.0f;
}

// A row whose codes are all zero: SCB 0 (0 * inf is NaN) or +inf (s = 0; inf * 0 is NaN).
inline bool zero_row(float scb) { return !(scb > 0.0f) || !(scb < INFINITY); }

inline int8_t code_of(float h, float s) {
  const float p = h * s;
  if (std::isnan(p)) return 0;
  return static_cast<int8_t>(std::nearbyint(p));  // default rounding mode: half to even
}

template <DType DT>
int64_t quantize_rows_scalar(const void* x, int64_t cols, int64_t r0, int64_t r1, int8_t* codes, float* scb,
                             const float* table) {
  int64_t bad_rows = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t base = r * cols;
    uint32_t m = 0;
    for (int64_t j = 0; j < cols; ++j) m = std::max(m, abs_bits<DT>(x, base + j));
    bad_rows += m >= inf_bits<DT>();
    const float am = row_scb<DT>(m);
    scb[r] = am;
    int8_t* out = codes + base;
    if (zero_row(am)) {
      std::memset(out, 0, static_cast<size_t>(cols));
      continue;
    }
    const float s = row_scale(am, table);
    for (int64_t j = 0; j < cols; ++j) out[j] = code_of(round_f16(load_elem<DT>(x, base + j)), s);
  }
  return bad_rows;
}

template <DType DT>
void dequantize_rows_scalar(const int8_t* codes, const float* scb, int64_t cols, int64_t r0, int64_t r1,
                            void* out) {
  const float k = bits_f32(kInv127Bits);
  for (int64_t r = r0; r < r1; ++r) {
    const float s = scb[r];
    for (int64_t j = r * cols; j < (r + 1) * cols; ++j) {
      const float w = static_cast<float>(codes[j]) * s;
      store_elem<DT>(out, j, w * k);
    }
  }
}

#if QM_X86
// ---------------------------------------------------------------------------------------------
// AVX2 (+FMA +F16C). 32 columns per step; the tail of a row runs the scalar element code.

template <DType DT>
QM_TARGET_AVX2 inline uint32_t row_max_bits_avx2(const void* p, int64_t base, int64_t cols) {
  int64_t j = 0;
  uint32_t m = 0;
  if constexpr (DT == DType::F32) {
    const auto* f = static_cast<const float*>(p) + base;
    const __m256i mask = _mm256_set1_epi32(0x7fffffff);
    __m256i v = _mm256_setzero_si256();
    for (; j + 8 <= cols; j += 8) {
      v = _mm256_max_epu32(v, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(f + j)), mask));
    }
    __m128i r = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    r = _mm_max_epu32(r, _mm_shuffle_epi32(r, 0x4e));
    r = _mm_max_epu32(r, _mm_shuffle_epi32(r, 0xb1));
    m = static_cast<uint32_t>(_mm_cvtsi128_si32(r));
  } else {
    const auto* h = static_cast<const uint16_t*>(p) + base;
    const __m256i mask = _mm256_set1_epi16(0x7fff);
    __m256i v = _mm256_setzero_si256();
    for (; j + 16 <= cols; j += 16) {
      v = _mm256_max_epu16(v, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + j)), mask));
    }
    v = _mm256_max_epu32(_mm256_and_si256(v, _mm256_set1_epi32(0xffff)), _mm256_srli_epi32(v, 16));
    __m128i r = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    r = _mm_max_epu32(r, _mm_shuffle_epi32(r, 0x4e));
    r = _mm_max_epu32(r, _mm_shuffle_epi32(r, 0xb1));
    m = static_cast<uint32_t>(_mm_cvtsi128_si32(r));
  }
  for (; j < cols; ++j) m = std::max(m, abs_bits<DT>(p, base + j));
  return m;
}

// 8 elements as the f32 values of their fp16 rounding.
template <DType DT>
QM_TARGET_AVX2 inline __m256 load8_f16_avx2(const void* p, int64_t i) {
  const __m256 v = load8_avx2<DT>(p, i);
  if constexpr (DT == DType::F16) return v;
  return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

QM_TARGET_AVX2 inline __m256i code8_avx2(__m256 h, __m256 s) {
  const __m256 p = _mm256_round_ps(_mm256_mul_ps(h, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_cvttps_epi32(p);
}

template <DType DT>
QM_TARGET_AVX2 int64_t quantize_rows_avx2(const void* x, int64_t cols, int64_t r0, int64_t r1, int8_t* codes,
                                          float* scb, const float* table) {
  int64_t bad_rows = 0;
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t base = r * cols;
    const uint32_t m = row_max_bits_avx2<DT>(x, base, cols);
    bad_rows += m >= inf_bits<DT>();
    const float am = row_scb<DT>(m);
    scb[r] = am;
    int8_t* out = codes + base;
    if (zero_row(am)) {
      std::memset(out, 0, static_cast<size_t>(cols));
      continue;
    }
    const float sv = row_scale(am, table);
    const __m256 s = _mm256_set1_ps(sv);
    int64_t j = 0;
    for (; j + 32 <= cols; j += 32) {
      const __m256i c0 = code8_avx2(load8_f16_avx2<DT>(x, base + j), s);
      const __m256i c1 = code8_avx2(load8_f16_avx2<DT>(x, base + j + 8), s);
      const __m256i c2 = code8_avx2(load8_f16_avx2<DT>(x, base + j + 16), s);
      const __m256i c3 = code8_avx2(load8_f16_avx2<DT>(x, base + j + 24), s);
      const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(c0, c1), _mm256_packs_epi32(c2, c3));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), _mm256_permutevar8x32_epi32(b, order));
    }
    for (; j < cols; ++j) out[j] = code_of(round_f16(load_elem<DT>(x, base + j)), sv);
  }
  return bad_rows;
}

template <DType DT>
QM_TARGET_AVX2 void dequantize_rows_avx2(const int8_t* codes, const float* scb, int64_t cols, int64_t r0,
                                         int64_t r1, void* out) {
  const float kf = bits_f32(kInv127Bits);
  const __m256 k = _mm256_set1_ps(kf);
  for (int64_t r = r0; r < r1; ++r) {
    const __m256 s = _mm256_set1_ps(scb[r]);
    const int64_t base = r * cols;
    int64_t j = 0;
    for (; j + 8 <= cols; j += 8) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + base + j));
      const __m256 w = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), s);
      store8_avx2<DT>(out, base + j, _mm256_mul_ps(w, k));
    }
    for (; j < cols; ++j) store_elem<DT>(out, base + j, static_cast<float>(codes[base + j]) * scb[r] * kf);
  }
}

// ---------------------------------------------------------------------------------------------
// AVX-512 (F, BW, VL, DQ). 16 columns per step, the row tail with masks (no scalar tail).

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1u);
}

template <DType DT>
QM_TARGET_AVX512 inline uint32_t row_max_bits_avx512(const void* p, int64_t base, int64_t cols) {
  __m512i v = _mm512_setzero_si512();
  if constexpr (DT == DType::F32) {
    const auto* f = static_cast<const float*>(p) + base;
    const __m512i mask = _mm512_set1_epi32(0x7fffffff);
    for (int64_t j = 0; j < cols; j += 16) {
      const __m512i b = _mm512_maskz_loadu_epi32(tail_mask(cols - j), f + j);
      v = _mm512_max_epu32(v, _mm512_and_si512(b, mask));
    }
    return static_cast<uint32_t>(_mm512_reduce_max_epu32(v));
  } else {
    // 32 elements per step on 16-bit lanes (no widening); the two halves of each dword are
    // combined at the end.
    const auto* h = static_cast<const uint16_t*>(p) + base;
    const __m512i mask = _mm512_set1_epi16(0x7fff);
    for (int64_t j = 0; j < cols; j += 32) {
      const int64_t left = cols - j;
      const __mmask32 valid = left >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << left) - 1u);
      v = _mm512_max_epu16(v, _mm512_and_si512(_mm512_maskz_loadu_epi16(valid, h + j), mask));
    }
    const __m512i lo = _mm512_and_si512(v, _mm512_set1_epi32(0xffff));
    return static_cast<uint32_t>(_mm512_reduce_max_epu32(_mm512_max_epu32(lo, _mm512_srli_epi32(v, 16))));
  }
}

template <DType DT>
QM_TARGET_AVX512 inline __m512 load16_f16_avx512(const void* p, int64_t i, __mmask16 valid) {
  if constexpr (DT == DType::F16) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(valid, static_cast<const uint16_t*>(p) + i));
  } else {
    __m512 v;
    if constexpr (DT == DType::F32) {
      v = _mm512_maskz_loadu_ps(valid, static_cast<const float*>(p) + i);
    } else {
      const __m256i h = _mm256_maskz_loadu_epi16(valid, static_cast<const uint16_t*>(p) + i);
      v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

template <DType DT>
QM_TARGET_AVX512 int64_t quantize_rows_avx512(const void* x, int64_t cols, int64_t r0, int64_t r1,
                                              int8_t* codes, float* scb, const float* table) {
  int64_t bad_rows = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t base = r * cols;
    const uint32_t m = row_max_bits_avx512<DT>(x, base, cols);
    bad_rows += m >= inf_bits<DT>();
    const float am = row_scb<DT>(m);
    scb[r] = am;
    int8_t* out = codes + base;
    if (zero_row(am)) {
      std::memset(out, 0, static_cast<size_t>(cols));
      continue;
    }
    const __m512 s = _mm512_set1_ps(row_scale(am, table));
    // 64 columns per step: four 16-lane code vectors packed to bytes (saturation never acts: codes
    // are in [-127, 127]) and put back in column order, one 64-byte store instead of four narrowing
    // masked stores.
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __mmask16 all = 0xffff;
    int64_t j0 = 0;
    for (; j0 + 64 <= cols; j0 += 64) {
      __m512i c[4];
      for (int q = 0; q < 4; ++q) {
        c[q] = _mm512_cvt_roundps_epi32(_mm512_mul_ps(load16_f16_avx512<DT>(x, base + j0 + 16 * q, all), s), kRound);
      }
      const __m512i b = _mm512_packs_epi16(_mm512_packs_epi32(c[0], c[1]), _mm512_packs_epi32(c[2], c[3]));
      _mm512_storeu_si512(out + j0, _mm512_permutexvar_epi32(order, b));
    }
    for (int64_t j = j0; j < cols; j += 16) {
      const __mmask16 valid = tail_mask(cols - j);
      const __m512 p = _mm512_mul_ps(load16_f16_avx512<DT>(x, base + j, valid), s);
      const __m512i c = _mm512_cvt_roundps_epi32(p, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm512_mask_cvtepi32_storeu_epi8(out + j, valid, c);
    }
  }
  return bad_rows;
}

template <DType DT>
QM_TARGET_AVX512 inline void store16_avx512(void* p, int64_t i, __m512 v, __mmask16 valid) {
  if constexpr (DT == DType::F32) {
    _mm512_mask_storeu_ps(static_cast<float*>(p) + i, valid, v);
  } else {
    __m256i h;
    if constexpr (DT == DType::F16) {
      h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      const __m512i u = _mm512_castps_si512(v);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
      const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
      h = _mm512_cvtepi32_epi16(r);
    }
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p) + i, valid, h);
  }
}

template <DType DT>
QM_TARGET_AVX512 void dequantize_rows_avx512(const int8_t* codes, const float* scb, int64_t cols, int64_t r0,
                                             int64_t r1, void* out) {
  const __m512 k = _mm512_set1_ps(bits_f32(kInv127Bits));
  for (int64_t r = r0; r < r1; ++r) {
    const __m512 s = _mm512_set1_ps(scb[r]);
    const int64_t base = r * cols;
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 valid = tail_mask(cols - j);
      const __m128i q = _mm_maskz_loadu_epi8(valid, codes + base + j);
      const __m512 w = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), s);
      store16_avx512<DT>(out, base + j, _mm512_mul_ps(w, k), valid);
    }
  }
}
#endif  // QM_X86

using QuantizeRowsFn = int64_t (*)(const void*, int64_t, int64_t, int64_t, int8_t*, float*, const float*);
using DequantizeRowsFn = void (*)(const int8_t*, const float*, int64_t, int64_t, int64_t, void*);

template <DType DT>
QuantizeRowsFn pick_quantize_dt(Isa isa) {
#if QM_X86
  if (isa == Isa::AVX512) return quantize_rows_avx512<DT>;
  if (isa == Isa::AVX2) return quantize_rows_avx2<DT>;
#endif
  (void)isa;
  return quantize_rows_scalar<DT>;
}

template <DType DT>
DequantizeRowsFn pick_dequantize_dt(Isa isa) {
#if QM_X86
  if (isa == Isa::AVX512) return dequantize_rows_avx512<DT>;
  if (isa == Isa::AVX2) return dequantize_rows_avx2<DT>;
#endif
  (void)isa;
  return dequantize_rows_scalar<DT>;
}

// ---------------------------------------------------------------------------------------------
// GEMV: x widened to f32 once per call; threads split the output rows.

void widen(const void* x, DType dt, int64_t n, float* xf) {
  for (int64_t i = 0; i < n; ++i) {
    switch (dt) {
      case DType::F32:
        xf[i] = load_elem<DType::F32>(x, i);
        break;
      case DType::F16:
        xf[i] = load_elem<DType::F16>(x, i);
        break;
      default:
        xf[i] = load_elem<DType::BF16>(x, i);
    }
  }
}

void store_out(void* y, DType dt, int64_t i, float v) {
  switch (dt) {
    case DType::F32:
      return store_elem<DType::F32>(y, i, v);
    case DType::F16:
      return store_elem<DType::F16>(y, i, v);
    default:
      return store_elem<DType::BF16>(y, i, v);
  }
}

struct GemvInt8 {
  const float* xf;  // [batch, K] f32
  int64_t batch, K;
  const int8_t* codes;
  const float* scb;
  float* acc;  // [batch, O]: sums before scaling
};

// Scalar reference: exact products, float64 sums; only the final scaling and the output round.
void gemv_rows_scalar(const GemvInt8& a, int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    const int8_t* w = a.codes + o * a.K;
    for (int64_t b = 0; b < a.batch; ++b) {
      const float* xb = a.xf + b * a.K;
      double total = 0.0;
      for (int64_t k = 0; k < a.K; ++k) total += static_cast<double>(xb[k]) * static_cast<double>(w[k]);
      a.acc[o * a.batch + b] = static_cast<float>(total);
    }
  }
}

#if QM_X86
// The same 64 bytes of row `row` (the next tile's, R rows on), into L1: one line per 64 weights a
// row reads. With only the hardware prefetcher, R interleaved row streams from DRAM ran at 0.4x the
// speed of cache-resident weights (SmolLM2-135M's 210 projections, one thread, Xeon: 21 -> 13 ms per
// token with the prefetch, AVX2 and AVX-512 alike). Past the codes' end (the last tile) a prefetch is a
// hint that never faults.
inline void prefetch_next_tile(const GemvInt8& a, int64_t row, int64_t k) {
  _mm_prefetch(reinterpret_cast<const char*>(a.codes + row * a.K + k), _MM_HINT_T0);
}

// R rows x B tokens, 8 weights per step (each x load serves R rows); the row tail in scalar code.
// R x B accumulators + R weights + 1 x stay within the 16 ymm registers.
template <int B, int R>
QM_TARGET_AVX2 inline void gemv_tile_avx2(const GemvInt8& a, int64_t o) {
  const int64_t K = a.K;
  __m256 acc[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) acc[r][b] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 w[R];
    for (int r = 0; r < R; ++r) {
      if ((k & 63) == 0) prefetch_next_tile(a, o + r + R, k);
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(a.codes + (o + r) * K + k));
      w[r] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
    }
    for (int b = 0; b < B; ++b) {
      const __m256 xv = _mm256_loadu_ps(a.xf + b * K + k);
      for (int r = 0; r < R; ++r) acc[r][b] = _mm256_fmadd_ps(w[r], xv, acc[r][b]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const int8_t* wr = a.codes + (o + r) * K;
    for (int b = 0; b < B; ++b) {
      const __m256 s8 = acc[r][b];
      __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
      s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
      s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
      float total = _mm_cvtss_f32(s4);
      const float* xb = a.xf + b * K;
      for (int64_t t = k; t < K; ++t) total += xb[t] * static_cast<float>(wr[t]);
      a.acc[(o + r) * a.batch + b] = total;
    }
  }
}

template <int B>
QM_TARGET_AVX2 void gemv_rows_avx2_b(const GemvInt8& a, int64_t o0, int64_t o1) {
  constexpr int R = B <= 2 ? 4 : (B <= 4 ? 2 : 1);
  int64_t o = o0;
  for (; o + R <= o1; o += R) gemv_tile_avx2<B, R>(a, o);
  for (; o < o1; ++o) gemv_tile_avx2<B, 1>(a, o);
}

// R rows x B tokens at a time, 16 weights per step, the row tail with masks. Each x vector loaded
// serves R rows (x of 8 tokens is 128 KiB for K = 4096: from L2, so its loads bound the loop), and
// the R x B accumulators are independent FMA chains.
template <int B, int R>
QM_TARGET_AVX512 inline void gemv_tile_avx512(const GemvInt8& a, int64_t o) {
  const int64_t K = a.K;
  __m512 acc[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 valid = tail_mask(K - k);
    __m512 w[R];
    for (int r = 0; r < R; ++r) {
      if ((k & 63) == 0) prefetch_next_tile(a, o + r + R, k);
      const __m128i q = _mm_maskz_loadu_epi8(valid, a.codes + (o + r) * K + k);
      w[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
    }
    for (int b = 0; b < B; ++b) {
      const __m512 xv = _mm512_maskz_loadu_ps(valid, a.xf + b * K + k);
      for (int r = 0; r < R; ++r) acc[r][b] = _mm512_fmadd_ps(w[r], xv, acc[r][b]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) a.acc[(o + r) * a.batch + b] = _mm512_reduce_add_ps(acc[r][b]);
}

template <int B>
QM_TARGET_AVX512 void gemv_rows_avx512_b(const GemvInt8& a, int64_t o0, int64_t o1) {
  constexpr int R = B <= 4 ? 4 : 2;  // R x B accumulators <= 16 of the 32 zmm registers
  int64_t o = o0;
  for (; o + R <= o1; o += R) gemv_tile_avx512<B, R>(a, o);
  for (; o < o1; ++o) gemv_tile_avx512<B, 1>(a, o);
}

using GemvRowsFn = void (*)(const GemvInt8&, int64_t, int64_t);

template <int B>
GemvRowsFn pick_gemv_b(Isa isa) {
  if (isa == Isa::AVX512) return gemv_rows_avx512_b<B>;
  if (isa == Isa::AVX2) return gemv_rows_avx2_b<B>;
  return gemv_rows_scalar;
}

GemvRowsFn pick_gemv(Isa isa, int64_t batch) {
  switch (batch) {
    case 1: return pick_gemv_b<1>(isa);
    case 2: return pick_gemv_b<2>(isa);
    case 3: return pick_gemv_b<3>(isa);
    case 4: return pick_gemv_b<4>(isa);
    case 5: return pick_gemv_b<5>(isa);
    case 6: return pick_gemv_b<6>(isa);
    case 7: return pick_gemv_b<7>(isa);
    default: return pick_gemv_b<8>(isa);
  }
}
#endif  // QM_X86

void check_shape(int64_t rows, int64_t cols) {
  if (rows < 0 || cols < 0) {
    throw std::invalid_argument("rows and cols must be >= 0, got " + std::to_string(rows) + " x " +
                                std::to_string(cols));
  }
}

}  // namespace

int64_t quantize_int8(const void* x, DType dtype, int64_t rows, int64_t cols, int8_t* codes, float* scb,
                      const float* scale_table, Isa isa, int threads) {
  check_shape(rows, cols);
  if (rows == 0 || cols == 0) {
    for (int64_t r = 0; r < rows; ++r) scb[r] = 0.0f;
    return 0;
  }
  isa = resolve_isa(isa);
  advise_hugepages(codes, static_cast<size_t>(rows * cols));  // fresh outputs: fewer first-touch faults
  QuantizeRowsFn fn = dtype == DType::F32   ? pick_quantize_dt<DType::F32>(isa)
                      : dtype == DType::F16 ? pick_quantize_dt<DType::F16>(isa)
                                            : pick_quantize_dt<DType::BF16>(isa);
  std::atomic<int64_t> bad{0};
  parallel_for(rows, threads, row_grain(cols), [&](int64_t r0, int64_t r1) {
    const int64_t b = fn(x, cols, r0, r1, codes, scb, scale_table);
    if (b) bad += b;
  });
  return bad.load();
}

void dequantize_int8(const int8_t* codes, const float* scb, int64_t rows, int64_t cols, void* out,
                     DType out_dtype, Isa isa, int threads) {
  check_shape(rows, cols);
  if (rows == 0 || cols == 0) return;
  isa = resolve_isa(isa);
  advise_hugepages(out, static_cast<size_t>(rows * cols * dtype_size(out_dtype)));
  DequantizeRowsFn fn = out_dtype == DType::F32   ? pick_dequantize_dt<DType::F32>(isa)
                        : out_dtype == DType::F16 ? pick_dequantize_dt<DType::F16>(isa)
                                                  : pick_dequantize_dt<DType::BF16>(isa);
  parallel_for(rows, threads, row_grain(cols), [&](int64_t r0, int64_t r1) { fn(codes, scb, cols, r0, r1, out); });
}

void gemv_int8(const void* x, DType x_dtype, int64_t batch, int64_t in_features, int64_t out_features,
               const int8_t* codes, const float* scb, void* y, Isa isa, int threads) {
  if (batch < 1 || batch > kGemvInt8MaxBatch) {
    throw std::invalid_argument("gemv_int8: batch must be 1.." + std::to_string(kGemvInt8MaxBatch) + ", got " +
                                std::to_string(batch));
  }
  check_shape(out_features, in_features);
  if (out_features == 0) return;
  isa = resolve_isa(isa);
  std::vector<float> xf(static_cast<size_t>(batch * in_features));
  widen(x, x_dtype, batch * in_features, xf.data());
  std::vector<float> acc(static_cast<size_t>(batch * out_features));
  const GemvInt8 a{xf.data(), batch, in_features, codes, scb, acc.data()};
#if QM_X86
  const GemvRowsFn fn = pick_gemv(isa, batch);
#else
  const auto fn = gemv_rows_scalar;
#endif
  const float k = bits_f32(kInv127Bits);
  // Rows of at least ~16 KiB of weights per chunk.
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(in_features, 1));
  parallel_for(out_features, threads, grain, [&](int64_t o0, int64_t o1) {
    fn(a, o0, o1);
    for (int64_t o = o0; o < o1; ++o) {
      const float scale = scb[o] * k;
      for (int64_t b = 0; b < batch; ++b) store_out(y, x_dtype, b * out_features + o, acc[o * batch + b] * scale);
    }
  });
}

}  // namespace qm
