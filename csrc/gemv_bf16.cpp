// Dense bf16 GEMV (see gemv_bf16.h). Threads split the output rows; a tile of R rows streams its
// weights once and shares every load of x (x is widened to float32 once per call and stays in L1).
#include "gemv_bf16.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "float_convert.h"
#include "simd_store.h"
#include "thread_pool.h"

#if QM_X86
#include <immintrin.h>
#endif

namespace qm {

namespace {

template <DType DT>
void widen(const GemvBf16Args& a, std::vector<float>& xf) {
  const int64_t n = a.batch * a.in_features;
  xf.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) xf[static_cast<size_t>(i)] = load_elem<DT>(a.x, i);
}

void store_y(const GemvBf16Args& a, int64_t idx, float v) {
  switch (a.x_dtype) {
    case DType::F32:
      return store_elem<DType::F32>(a.y, idx, v);
    case DType::F16:
      return store_elem<DType::F16>(a.y, idx, v);
    default:
      return store_elem<DType::BF16>(a.y, idx, v);
  }
}

// Scalar reference: products and sums in float64, only the output rounds.
void rows_scalar(const GemvBf16Args& a, const float* xf, int64_t o0, int64_t o1) {
  const int64_t K = a.in_features;
  for (int64_t o = o0; o < o1; ++o) {
    const uint16_t* w = a.w + o * K;
    for (int64_t b = 0; b < a.batch; ++b) {
      const float* xb = xf + b * K;
      double total = 0.0;
      for (int64_t k = 0; k < K; ++k) total += double{xb[k]} * double{bf16_to_f32(w[k])};
      store_y(a, b * a.out_features + o, static_cast<float>(total));
    }
  }
}

// Rows per tile for B activations: R * B accumulators in registers (at most 16).
template <int B>
constexpr int tile_rows() {
  return B == 1 ? 8 : B == 2 ? 4 : B <= 4 ? 2 : 1;
}

#if QM_X86
QM_TARGET_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

template <int B, int R>
QM_TARGET_AVX2 void tile_avx2(const GemvBf16Args& a, const float* xf, int64_t o) {
  const int64_t K = a.in_features, Kv = K / 8 * 8;
  __m256 acc[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) acc[r][b] = _mm256_setzero_ps();
  const char* next = reinterpret_cast<const char*>(a.w + (o + R) * K);  // as in tile_avx512
  const char* next_end = reinterpret_cast<const char*>(a.w + std::min(o + 2 * R, a.out_features) * K);
  const int64_t step = (R * 16 + 63) / 64 * 64;
  for (int64_t k = 0; k < Kv; k += 8) {
    for (int64_t l = 0; l < step && next < next_end; l += 64, next += 64) _mm_prefetch(next, _MM_HINT_T0);
    __m256 w[R];
    for (int r = 0; r < R; ++r) w[r] = load8_avx2<DType::BF16>(a.w, (o + r) * K + k);
    for (int b = 0; b < B; ++b) {
      const __m256 xv = _mm256_loadu_ps(xf + b * K + k);
      for (int r = 0; r < R; ++r) acc[r][b] = _mm256_fmadd_ps(w[r], xv, acc[r][b]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const uint16_t* w = a.w + (o + r) * K;
    for (int b = 0; b < B; ++b) {
      float total = hsum_avx2(acc[r][b]);
      for (int64_t k = Kv; k < K; ++k) total += xf[b * K + k] * bf16_to_f32(w[k]);
      store_y(a, b * a.out_features + o + r, total);
    }
  }
}

template <int B>
QM_TARGET_AVX2 void rows_avx2(const GemvBf16Args& a, const float* xf, int64_t o0, int64_t o1) {
  constexpr int R = tile_rows<B>();
  int64_t o = o0;
  for (; o + R <= o1; o += R) tile_avx2<B, R>(a, xf, o);
  for (; o < o1; ++o) tile_avx2<B, 1>(a, xf, o);
}

// 16 bf16 -> 16 f32.
QM_TARGET_AVX512 inline __m512 widen16_avx512(const uint16_t* p) {
  const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

template <int B, int R>
QM_TARGET_AVX512 void tile_avx512(const GemvBf16Args& a, const float* xf, int64_t o) {
  const int64_t K = a.in_features, Kv = K / 16 * 16;
  __m512 acc[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) acc[r][b] = _mm512_setzero_ps();
  // The R rows are one contiguous span of R * K weights; the next tile's span is prefetched at the
  // same pace (the hardware prefetcher alone keeps R interleaved streams at ~40% of DRAM bandwidth).
  const char* next = reinterpret_cast<const char*>(a.w + (o + R) * K);
  const char* next_end = reinterpret_cast<const char*>(a.w + std::min(o + 2 * R, a.out_features) * K);
  const int64_t step = (R * 32 + 63) / 64 * 64;  // bytes of the span consumed per k step, whole lines
  for (int64_t k = 0; k < Kv; k += 16) {
    for (int64_t l = 0; l < step && next < next_end; l += 64, next += 64) _mm_prefetch(next, _MM_HINT_T0);
    __m512 w[R];
    for (int r = 0; r < R; ++r) w[r] = widen16_avx512(a.w + (o + r) * K + k);
    for (int b = 0; b < B; ++b) {
      const __m512 xv = _mm512_loadu_ps(xf + b * K + k);
      for (int r = 0; r < R; ++r) acc[r][b] = _mm512_fmadd_ps(w[r], xv, acc[r][b]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const uint16_t* w = a.w + (o + r) * K;
    for (int b = 0; b < B; ++b) {
      float total = _mm512_reduce_add_ps(acc[r][b]);
      for (int64_t k = Kv; k < K; ++k) total += xf[b * K + k] * bf16_to_f32(w[k]);
      store_y(a, b * a.out_features + o + r, total);
    }
  }
}

template <int B>
QM_TARGET_AVX512 void rows_avx512(const GemvBf16Args& a, const float* xf, int64_t o0, int64_t o1) {
  constexpr int R = tile_rows<B>();
  int64_t o = o0;
  for (; o + R <= o1; o += R) tile_avx512<B, R>(a, xf, o);
  for (; o < o1; ++o) tile_avx512<B, 1>(a, xf, o);
}
#endif  // QM_X86

using RowsFn = void (*)(const GemvBf16Args&, const float*, int64_t, int64_t);

RowsFn pick_rows(Isa isa, int64_t batch) {
#if QM_X86
  static constexpr RowsFn avx512[] = {rows_avx512<1>, rows_avx512<2>, rows_avx512<3>, rows_avx512<4>,
                                      rows_avx512<5>, rows_avx512<6>, rows_avx512<7>, rows_avx512<8>};
  static constexpr RowsFn avx2[] = {rows_avx2<1>, rows_avx2<2>, rows_avx2<3>, rows_avx2<4>,
                                    rows_avx2<5>, rows_avx2<6>, rows_avx2<7>, rows_avx2<8>};
  if (isa == Isa::AVX512) return avx512[batch - 1];
  if (isa == Isa::AVX2) return avx2[batch - 1];
#else
  (void)isa;
  (void)batch;
#endif
  return rows_scalar;
}

}  // namespace

void gemv_bf16(const GemvBf16Args& args, Isa isa, int threads) {
  if (args.batch < 1 || args.batch > kGemvBf16MaxBatch) {
    throw std::invalid_argument("batch " + std::to_string(args.batch) + " is outside 1..8");
  }
  if (args.in_features < 1) throw std::invalid_argument("in_features must be at least 1");
  isa = resolve_isa(isa);
  std::vector<float> xf;
  switch (args.x_dtype) {
    case DType::F32:
      widen<DType::F32>(args, xf);
      break;
    case DType::F16:
      widen<DType::F16>(args, xf);
      break;
    default:
      widen<DType::BF16>(args, xf);
  }
  const RowsFn fn = pick_rows(isa, args.batch);
  const float* xp = xf.data();
  // Grain 64 rows: a multiple of every tile height, and 64 rows of a 576-wide head are 72 KB.
  parallel_for(args.out_features, threads, 64, [&](int64_t o0, int64_t o1) { fn(args, xp, o0, o1); });
}

}  // namespace qm
