// See quant_stats.h. A scalar reference and an AVX2 path (8 lanes, picked at run time); both read x
// and the codes once, decoding each code as dequantize_4bit does (quant_map[q] * absmax, f32).
#include "quant_stats.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "float_convert.h"
#include "int8_cpu.h"
#if QM_X86
#include <immintrin.h>
#endif
#include "thread_pool.h"

namespace qm {
namespace {

constexpr int64_t kMaxBlock = 4096;
constexpr float kMaxFinite = 3.4028235e38f;
constexpr int64_t kGroupElements = 1 << 16;  // blocks per partial sum: fixed, whatever the threads

// fn over [0, n): threads == 1 runs on the calling thread without the pool, so a measurement in a
// background thread overlaps the pipeline's own kernels instead of queueing behind them (with the
// denormal flags the pool's workers run with); otherwise on the pool, an item per chunk.
template <typename Fn>
void run_items(int64_t n, int threads, const Fn& fn) {
  if (threads == 1) {
    ScopedDenormalsOn denormals;
    fn(0, n);
  } else {
    parallel_for(n, threads, 1, fn);
  }
}

// Scalar reference of one block [begin, begin + len): sums in f32, then into the float64 totals.
template <DType DT>
void block_scalar(const void* x, int64_t begin, int64_t len, const uint8_t* q, float am, const float* qmap,
                  QuantErrorStats& out) {
  float x2 = 0.0f, e2 = 0.0f, m = 0.0f;
  int64_t bad = 0;
  for (int64_t i = 0; i < len; ++i) {
    const float xv = load_elem<DT>(x, begin + i);
    const uint8_t byte = q[i / 2];
    const float vv = qmap[(i & 1) ? (byte & 15) : (byte >> 4)] * am;
    const float e = xv - vv;
    x2 += xv * xv;
    e2 += e * e;
    m = std::max(m, std::fabs(e));
    bad += !(std::fabs(xv) <= kMaxFinite);
  }
  out.sum_x2 += x2;
  out.sum_e2 += e2;
  out.max_abs_e = std::max<double>(out.max_abs_e, m);
  out.nonfinite += bad;
}

#if QM_X86
// 8 elements of x widened to f32.
template <DType DT>
QM_TARGET_AVX2 inline __m256 load8(const void* x, int64_t i) {
  if constexpr (DT == DType::F32) {
    return _mm256_loadu_ps(static_cast<const float*>(x) + i);
  } else if constexpr (DT == DType::F16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i)));
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

// The same block with 8 lanes: codes of 4 bytes -> 8 nibble indices (high nibble first), looked up
// in the 16-entry table with two permutes and a blend. The same values as the scalar path; the
// sums differ only in summation order (8 lanes), within the header's bound.
template <DType DT>
QM_TARGET_AVX2 void block_avx2(const void* x, int64_t begin, int64_t len, const uint8_t* q, float am,
                               const float* qmap, QuantErrorStats& out) {
  const __m256 lo_tab = _mm256_loadu_ps(qmap), hi_tab = _mm256_loadu_ps(qmap + 8);
  const __m256 amv = _mm256_set1_ps(am), sign = _mm256_set1_ps(-0.0f);
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m256i seven = _mm256_set1_epi32(7);
  __m256 x2 = _mm256_setzero_ps(), e2 = _mm256_setzero_ps(), m = _mm256_setzero_ps();
  const int64_t full = len & ~int64_t{7};
  for (int64_t i = 0; i < full; i += 8) {
    const __m256 xv = load8<DT>(x, begin + i);
    uint32_t word;
    std::memcpy(&word, q + i / 2, 4);
    const __m128i b = _mm_cvtsi32_si128(static_cast<int>(word));
    const __m128i nib = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), low4), _mm_and_si128(b, low4));
    const __m256i idx = _mm256_cvtepu8_epi32(nib);
    const __m256 from_lo = _mm256_permutevar8x32_ps(lo_tab, idx);
    const __m256 from_hi = _mm256_permutevar8x32_ps(hi_tab, idx);
    const __m256 use_hi = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven));
    const __m256 vv = _mm256_mul_ps(_mm256_blendv_ps(from_lo, from_hi, use_hi), amv);
    const __m256 e = _mm256_sub_ps(xv, vv);
    x2 = _mm256_add_ps(x2, _mm256_mul_ps(xv, xv));
    e2 = _mm256_add_ps(e2, _mm256_mul_ps(e, e));
    m = _mm256_max_ps(m, _mm256_andnot_ps(sign, e));
  }
  alignas(32) float lx2[8], le2[8], lm[8];
  _mm256_store_ps(lx2, x2);
  _mm256_store_ps(le2, e2);
  _mm256_store_ps(lm, m);
  QuantErrorStats tail;
  if (full < len) block_scalar<DT>(x, begin + full, len - full, q + full / 2, am, qmap, tail);
  float sx = 0.0f, se = 0.0f, mm = 0.0f;
  for (int j = 0; j < 8; ++j) {
    sx += lx2[j];
    se += le2[j];
    mm = std::max(mm, lm[j]);
  }
  if (!(std::fabs(sx) <= kMaxFinite)) {
    // A NaN/Inf in x makes the x^2 sum non-finite (max_ps would drop a NaN error): redo this block
    // on the scalar path, which counts the non-finite elements. Never taken for a finite input, so
    // the loop above carries no per-element check.
    block_scalar<DT>(x, begin, len, q, am, qmap, out);
    return;
  }
  // A non-finite absmax is caught by the caller per block.
  out.sum_x2 += double(sx) + tail.sum_x2;
  out.sum_e2 += double(se) + tail.sum_e2;
  out.max_abs_e = std::max({out.max_abs_e, double(mm), tail.max_abs_e});
  out.nonfinite += tail.nonfinite;
}
#endif

template <DType DT>
void group_stats(const void* x, int64_t n, int64_t blocksize, const uint8_t* packed, const float* absmax,
                 const float* qmap, bool avx2, int64_t b0, int64_t b1, QuantErrorStats& out) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = b * blocksize;
    const int64_t len = std::min(blocksize, n - begin);
    const float am = absmax[b];
    if (!(std::fabs(am) <= kMaxFinite)) {  // a corrupt absmax: every value of the block is NaN/Inf
      out.nonfinite += len;
      out.max_abs_e = INFINITY;
      out.sum_e2 = INFINITY;
      continue;
    }
#if QM_X86
    if (avx2) {
      block_avx2<DT>(x, begin, len, packed + begin / 2, am, qmap, out);
      continue;
    }
#endif
    block_scalar<DT>(x, begin, len, packed + begin / 2, am, qmap, out);
  }
}

}  // namespace
QuantErrorStats quant_error_stats(const void* x, DType dtype, int64_t n, int64_t blocksize, const uint8_t* packed,
                                  const float* absmax, const float* quant_map, Isa isa, int threads) {
  if (blocksize <= 0 || blocksize > kMaxBlock || blocksize % 2) {
    throw std::invalid_argument("blocksize must be an even number in 2..4096, got " + std::to_string(blocksize));
  }
  QuantErrorStats total;
  if (n <= 0) return total;
  const bool avx2 = resolve_isa(isa) != Isa::Scalar;
  const int64_t nb = (n + blocksize - 1) / blocksize;
  const int64_t per_group = std::max<int64_t>(1, kGroupElements / blocksize);
  const int64_t groups = (nb + per_group - 1) / per_group;
  std::vector<QuantErrorStats> partial(static_cast<size_t>(groups));
  const auto run = [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b0 = g * per_group, b1 = std::min(nb, b0 + per_group);
      switch (dtype) {
        case DType::F32:
          group_stats<DType::F32>(x, n, blocksize, packed, absmax, quant_map, avx2, b0, b1, partial[g]);
          break;
        case DType::F16:
          group_stats<DType::F16>(x, n, blocksize, packed, absmax, quant_map, avx2, b0, b1, partial[g]);
          break;
        case DType::BF16:
          group_stats<DType::BF16>(x, n, blocksize, packed, absmax, quant_map, avx2, b0, b1, partial[g]);
          break;
      }
    }
  };
  run_items(groups, threads, run);
  for (const auto& p : partial) {  // in group order: the same sums for any thread count
    total.sum_x2 += p.sum_x2;
    total.sum_e2 += p.sum_e2;
    total.max_abs_e = std::max(total.max_abs_e, p.max_abs_e);
    total.nonfinite += p.nonfinite;
  }
  return total;
}

namespace {

template <DType DT>
QuantErrorStats int8_row_stats(const void* x, int64_t row, int64_t cols, const int8_t* codes, float scb) {
  const float k = bits_f32(kInv127Bits);
  QuantErrorStats out;
  float m = 0.0f;
  bool nan = false;
  const int64_t base = row * cols;
  for (int64_t j = 0; j < cols; ++j) {
    const float xv = load_elem<DT>(x, base + j);
    const float w = (static_cast<float>(codes[base + j]) * scb) * k;
    const bool decoded = std::fabs(w) <= kMaxFinite;
    const float e = decoded ? xv - w : xv;
    out.nonfinite += !(decoded && std::fabs(xv) <= kMaxFinite);
    out.sum_x2 += double(xv) * double(xv);
    out.sum_e2 += double(e) * double(e);
    const float ae = std::fabs(e);
    if (ae != ae) {
      nan = true;
    } else {
      m = std::max(m, ae);
    }
  }
  out.max_abs_e = nan ? double(NAN) : double(m);
  return out;
}

}  // namespace

QuantErrorStats int8_error_stats(const void* x, DType dtype, int64_t rows, int64_t cols, const int8_t* codes,
                                 const float* scb, int threads) {
  QuantErrorStats total;
  if (rows <= 0 || cols <= 0) return total;
  std::vector<QuantErrorStats> per_row(static_cast<size_t>(rows));
  const auto run = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      switch (dtype) {
        case DType::F32: per_row[r] = int8_row_stats<DType::F32>(x, r, cols, codes, scb[r]); break;
        case DType::F16: per_row[r] = int8_row_stats<DType::F16>(x, r, cols, codes, scb[r]); break;
        case DType::BF16: per_row[r] = int8_row_stats<DType::BF16>(x, r, cols, codes, scb[r]); break;
      }
    }
  };
  run_items(rows, threads, run);
  bool nan = false;
  for (const auto& p : per_row) {  // in row order: the same sums for any thread count
    total.sum_x2 += p.sum_x2;
    total.sum_e2 += p.sum_e2;
    if (p.max_abs_e != p.max_abs_e) nan = true;
    else total.max_abs_e = std::max(total.max_abs_e, p.max_abs_e);
    total.nonfinite += p.nonfinite;
  }
  if (nan) total.max_abs_e = double(NAN);
  return total;
}

namespace {

// Elements whose exponent bits are all ones (NaN or Inf): an integer loop the compiler vectorizes.
template <typename U, U kExp>
int64_t count_exp_all_ones(const U* p, int64_t n) {
  int64_t bad = 0;
  for (int64_t i0 = 0; i0 < n; i0 += int64_t{1} << 30) {  // 32-bit counts: narrower vector lanes
    const int64_t i1 = std::min(n, i0 + (int64_t{1} << 30));
    uint32_t part = 0;
    for (int64_t i = i0; i < i1; ++i) part += static_cast<uint32_t>((p[i] & kExp) == kExp);
    bad += part;
  }
  return bad;
}

}  // namespace

int64_t count_nonfinite(const void* x, DType dtype, int64_t n, int threads) {
  std::atomic<int64_t> total{0};
  parallel_for(n, threads, 1 << 16, [&](int64_t i0, int64_t i1) {
    int64_t bad = 0;
    if (dtype == DType::F32) {
      bad = count_exp_all_ones<uint32_t, 0x7F800000u>(static_cast<const uint32_t*>(x) + i0, i1 - i0);
    } else if (dtype == DType::F16) {
      bad = count_exp_all_ones<uint16_t, 0x7C00>(static_cast<const uint16_t*>(x) + i0, i1 - i0);
    } else {
      bad = count_exp_all_ones<uint16_t, 0x7F80>(static_cast<const uint16_t*>(x) + i0, i1 - i0);
    }
    total += bad;
  });
  return total.load();
}

}  // namespace qm
