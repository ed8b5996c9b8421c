// Fused 4-bit GEMV. Threads split the output rows; each row streams its packed codes once
// (a quarter of the bytes of bf16) and decodes nibbles with an in-register 16-entry table.
//
// Trick: inside a 32-element group the high nibbles are the even elements and the low nibbles the
// odd ones. Instead of interleaving decoded weights, x is permuted once per call to the same
// (even, odd) order, so decoding is a shift, a mask and two table permutes per 32 weights.
//
// Two paths are not the f32 product quant_map[q] * absmax:
// - AVX512-BF16 (isa avx512bf16, bfloat16 x, blocksize >= 64): code values are rounded to bfloat16 in a
//   word table and vdpbf16ps multiplies them with x kept in bfloat16 (exact products, float32 sums),
//   half the shuffle and FMA work per weight of the f32 path; see group_bf16dot.
// - AVX2 with 16-bit x (bfloat16 or float16, blocksize >= 64): code values and x as 15-bit integers
//   (x scaled per 64 elements), exact integer products and sums per 64 weights (vpmaddwd); see
//   rows_i16. A third of the shuffles of the f32 AVX2 path per weight.
#include "gemv_cpu.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "codebooks.h"
#include "float_convert.h"
#include "simd_store.h"
#include "thread_pool.h"

#if QM_X86
#include <immintrin.h>
#endif

namespace qm {

namespace {

// absmax of block i: stored f32, or decoded from the nested record exactly as dequantize_nested does.
inline float block_absmax(const Gemv4bitArgs& a, int64_t i) {
  if (a.absmax != nullptr) return a.absmax[i];
  const float scaled = a.map8[a.absmax_codes[i]] * a.nested_absmax[i / kNestedBlocksize];
  return scaled + a.offset;
}

// The AVX2 integer path (rows_i16): code values and x as integers of at most this magnitude, x scaled per
// chunk of kI16Chunk elements.
constexpr int kI16Scale = 16383;
constexpr int64_t kI16Chunk = 64;

// Where element j of a group of `group` goes: (even..., odd...), or with group kQuads (the AVX2 kernel's
// byte-plane lookup, rows_avx2) in runs of 8: four even elements, then the four odd ones after them.
constexpr int64_t kQuads = -32;

inline int64_t permuted_index(int64_t group, int64_t j) {
  if (group == kQuads) return 8 * (j / 8) + 4 * (j % 2) + (j / 2) % 4;
  return j % 2 == 0 ? j / 2 : group / 2 + j / 2;
}

// x widened to f32, and within each group reordered as the rows kernel decodes (permuted_index).
template <DType DT>
void widen_permuted(const Gemv4bitArgs& a, int64_t group, std::vector<float, CacheLineAllocator<float>>& xf) {
  const int64_t K = a.in_features, size = group == kQuads ? 32 : group;
  xf.resize(static_cast<size_t>(a.batch * K));
  for (int64_t b = 0; b < a.batch; ++b) {
    for (int64_t g = 0; g < K; g += size) {
      for (int64_t j = 0; j < size; ++j) {
        const int64_t dst = g + permuted_index(group, j);
        xf[static_cast<size_t>(b * K + dst)] = load_elem<DT>(a.x, b * K + g + j);
      }
    }
  }
}

void widen_dispatch(const Gemv4bitArgs& a, int64_t group, std::vector<float, CacheLineAllocator<float>>& xf) {
  switch (a.x_dtype) {
    case DType::F32:
      return widen_permuted<DType::F32>(a, group, xf);
    case DType::F16:
      return widen_permuted<DType::F16>(a, group, xf);
    default:
      return widen_permuted<DType::BF16>(a, group, xf);
  }
}

void store_y(const Gemv4bitArgs& a, int64_t idx, float v) {
  switch (a.x_dtype) {
    case DType::F32:
      return store_elem<DType::F32>(a.y, idx, v);
    case DType::F16:
      return store_elem<DType::F16>(a.y, idx, v);
    default:
      return store_elem<DType::BF16>(a.y, idx, v);
  }
}

// Scalar reference: x in natural order (group 2 = no permutation). The weight is the f32 product
// quant_map[q] * absmax; products and sums are in float64 (slow, but only the output rounds).
void rows_scalar(const Gemv4bitArgs& a, const void* xv, int64_t o0, int64_t o1) {
  const float* xf = static_cast<const float*>(xv);
  const int64_t K = a.in_features, bs = a.blocksize, bpr = K / bs;
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* w = a.packed + o * (K / 2);
    for (int64_t b = 0; b < a.batch; ++b) {
      const float* xb = xf + b * K;
      double total = 0.0;
      for (int64_t blk = 0; blk < bpr; ++blk) {
        const float scale = block_absmax(a, o * bpr + blk);
        for (int64_t k = blk * bs; k < (blk + 1) * bs; k += 2) {
          const uint8_t byte = w[k >> 1];
          total += double{xb[k]} * double{a.quant_map[byte >> 4] * scale};
          total += double{xb[k + 1]} * double{a.quant_map[byte & 0xF] * scale};
        }
      }
      store_y(a, b * a.out_features + o, static_cast<float>(total));
    }
  }
}

#if QM_X86
QM_TARGET_AVX2 inline float hmax_avx2(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

QM_TARGET_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// out[t] = block_absmax(a, i0 + t) for t < n of a nested record (a.absmax null): the same float multiply
// and add, eight blocks per vector within each run that shares a nested absmax.
// The eight map8 values come from scalar loads (no gather: Intel's run as microcode under the GDS
// mitigation): 0.27 ns a block against 0.63 for block_absmax in a loop (Xeon, one thread). The row
// kernels call it for 16 rows at a time: SmolLM2-135M's 210 GEMVs per token, nested absmax, 6-10%
// faster on the avx2 and avx512bf16 paths than decoding per block or per span and row.
QM_TARGET_AVX2 inline void decode_absmax(const Gemv4bitArgs& a, int64_t i0, int64_t n, float* out) {
  const __m256 offset = _mm256_set1_ps(a.offset);
  const float* map8 = a.map8;
  for (int64_t t = 0; t < n;) {
    const int64_t i = i0 + t, q = i / kNestedBlocksize;
    const int64_t run = std::min(n - t, (q + 1) * kNestedBlocksize - i);  // blocks sharing nested_absmax[q]
    const float nested = a.nested_absmax[q];
    const __m256 nv = _mm256_set1_ps(nested);
    const uint8_t* c = a.absmax_codes + i;
    float* o = out + t;
    int64_t j = 0;
    for (; j + 8 <= run; j += 8) {
      uint64_t b;
      std::memcpy(&b, c + j, 8);
      const __m256 m = _mm256_setr_ps(map8[b & 255], map8[(b >> 8) & 255], map8[(b >> 16) & 255],
                                      map8[(b >> 24) & 255], map8[(b >> 32) & 255], map8[(b >> 40) & 255],
                                      map8[(b >> 48) & 255], map8[b >> 56]);
      _mm256_storeu_ps(o + j, _mm256_add_ps(_mm256_mul_ps(m, nv), offset));
    }
    for (; j < run; ++j) {
      const float scaled = map8[c[j]] * nested;
      o[j] = scaled + a.offset;
    }
    t += run;
  }
}

// Rows decoded together: a nested absmax is decoded for this many rows at a time (group_absmax).
constexpr int64_t kAbsmaxRows = 16;

// The absmax of rows g..g1 (at most kAbsmaxRows), row after row: the stored ones, or a nested record's
// decoded into buf (kAbsmaxRows * blocks per row floats; allocated only for a nested record).
QM_TARGET_AVX2 inline const float* group_absmax(const Gemv4bitArgs& a, int64_t g, int64_t g1, std::vector<float>& buf) {
  const int64_t bpr = a.in_features / a.blocksize;
  if (a.absmax != nullptr) return a.absmax + g * bpr;
  buf.resize(static_cast<size_t>(kAbsmaxRows * bpr));
  decode_absmax(a, g * bpr, (g1 - g) * bpr, buf.data());
  return buf.data();
}

// AVX2: 32 weights per step (16 bytes). The 16-entry f32 table is held as its four byte planes, and one
// vpshufb per plane looks up 32 nibbles at once (high nibbles, the even weights, in the low lane; low
// nibbles, the odd ones, in the high lane); byte and word unpacks put the four bytes of each value
// together, in runs of four even then four odd weights (x is permuted to that order: kQuads). Two permutes
// and a blend per 8 weights did the same lookup (several micro-ops each on AMD; one Zen 5 core: 10.9
// against 12.7 G weights/s, bench/probe_avx2_lookup.cpp). Each block sums code value x activation
// (unscaled) in independent FMA chains and scales the sum once by the block's absmax. A row's order of
// operations depends on K and the blocksize only, never on which rows a thread takes.
struct PlanesAvx2 {
  __m256i b[4];
};

QM_TARGET_AVX2 inline PlanesAvx2 planes_avx2(const float* quant_map) {
  alignas(32) uint8_t bytes[4][32];
  for (int i = 0; i < 16; ++i) {
    uint32_t u;
    std::memcpy(&u, quant_map + i, 4);
    for (int j = 0; j < 4; ++j) bytes[j][i] = bytes[j][i + 16] = static_cast<uint8_t>(u >> (8 * j));
  }
  PlanesAvx2 p;
  for (int j = 0; j < 4; ++j) p.b[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(bytes[j]));
  return p;
}

template <int B, int NA>
QM_TARGET_AVX2 inline void step_avx2(const uint8_t* w, const float* xf, int64_t K, int64_t k, const PlanesAvx2& t,
                                     __m256 (*part)[B]) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (k >> 1)));
  const __m128i m4 = _mm_set1_epi8(0x0F);
  const __m256i idx = _mm256_set_m128i(_mm_and_si128(v, m4), _mm_and_si128(_mm_srli_epi16(v, 4), m4));
  const __m256i b0 = _mm256_shuffle_epi8(t.b[0], idx), b1 = _mm256_shuffle_epi8(t.b[1], idx);
  const __m256i b2 = _mm256_shuffle_epi8(t.b[2], idx), b3 = _mm256_shuffle_epi8(t.b[3], idx);
  const __m256i l01 = _mm256_unpacklo_epi8(b0, b1), h01 = _mm256_unpackhi_epi8(b0, b1);
  const __m256i l23 = _mm256_unpacklo_epi8(b2, b3), h23 = _mm256_unpackhi_epi8(b2, b3);
  const __m256 f[4] = {_mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23)),
                       _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23)),
                       _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23)),
                       _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23))};
  for (int b = 0; b < B; ++b) {
    const float* xb = xf + b * K + k;
    for (int m = 0; m < 4; ++m) part[m % NA][b] = _mm256_fmadd_ps(f[m], _mm256_loadu_ps(xb + 8 * m), part[m % NA][b]);
  }
}

// How far ahead of its reads a row prefetches its codes into L1 (one line per 128 weights). One row's
// bytes follow the last's, but the hardware prefetcher alone left this kernel waiting on DRAM: SmolLM2-
// 135M's 210 projections, one thread, ran 2.4x slower with weights from memory than cache-resident
// (Xeon, forced AVX2 path: 24 -> 11.8 ms per token with the prefetch; 512 bytes ahead: 15 ms).
constexpr int64_t kAvx2Ahead = 2048;

template <int B>
QM_TARGET_AVX2 void rows_avx2(const Gemv4bitArgs& a, const void* xv, int64_t o0, int64_t o1) {
  constexpr int NA = B == 1 ? 4 : 2;  // FMA chains per batch row
  const float* xf = static_cast<const float*>(xv);
  const int64_t K = a.in_features, bs = a.blocksize, bpr = K / bs;
  const PlanesAvx2 planes = planes_avx2(a.quant_map);
  std::vector<float> decoded;
  const float* group = nullptr;
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* w = a.packed + o * (K / 2);
    const int64_t g = o0 + (o - o0) / kAbsmaxRows * kAbsmaxRows;  // first row of o's group
    if (o == g) group = group_absmax(a, g, std::min(o1, g + kAbsmaxRows), decoded);
    const float* scales = group + (o - g) * bpr;
    __m256 acc[B];
    for (int b = 0; b < B; ++b) acc[b] = _mm256_setzero_ps();
    for (int64_t blk = 0; blk < bpr; ++blk) {
      __m256 part[NA][B];
      for (int n = 0; n < NA; ++n)
        for (int b = 0; b < B; ++b) part[n][b] = _mm256_setzero_ps();
      for (int64_t k = blk * bs; k < (blk + 1) * bs; k += 32) {
        if ((k & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (k >> 1) + kAvx2Ahead), _MM_HINT_T0);
        step_avx2<B, NA>(w, xf, K, k, planes, part);
      }
      const __m256 scale = _mm256_broadcast_ss(scales + blk);
      for (int b = 0; b < B; ++b) {
        __m256 sum = part[0][b];
        for (int n = 1; n < NA; ++n) sum = _mm256_add_ps(sum, part[n][b]);
        acc[b] = _mm256_fmadd_ps(sum, scale, acc[b]);
      }
    }
    for (int b = 0; b < B; ++b) store_y(a, b * a.out_features + o, hsum_avx2(acc[b]));
  }
}

// AVX-512: 32 weights per step (16 bytes); x permuted in groups of 32.
//
// Work is tiled so the activations stay in L1: a group of kGroup rows is swept over K in chunks of
// about 32 KB of x, and inside a chunk R rows at a time share every load of x (for B = 8 the whole x
// is 128 KB and would otherwise stream from L2 once per row). Each decoded weight vector is scaled
// by its block's absmax once (the f32 product dequantize_4bit computes) and then feeds B FMAs.
// Partial sums live in acc (R x B vectors in registers) and are parked in `park` between chunks.
// Every 128 weights each row prefetches the same bytes of the row R further on (the next tile) into
// L2, as the AVX512-BF16 path does (group_bf16dot): weights streamed from DRAM wait less.
template <int B, int R>
QM_TARGET_AVX512 inline void tile_span_avx512(const Gemv4bitArgs& a, const float* xf, int64_t o, int64_t k0,
                                              int64_t k1, __m512* park, bool first) {
  const int64_t K = a.in_features, bs = a.blocksize, bpr = K / bs;
  const __m512 table = _mm512_loadu_ps(a.quant_map);
  const __m512i nib = _mm512_set1_epi32(0xF);
  const uint8_t* w[R];
  for (int r = 0; r < R; ++r) w[r] = a.packed + (o + r) * (K / 2);
  __m512 acc[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) acc[r][b] = first ? _mm512_setzero_ps() : park[r * B + b];
  for (int64_t k = k0; k < k1;) {
    const int64_t blk = k / bs, seg_end = std::min(k1, (blk + 1) * bs);
    __m512 scale[R];
    for (int r = 0; r < R; ++r) scale[r] = _mm512_set1_ps(block_absmax(a, (o + r) * bpr + blk));
    if constexpr (B * R <= 8) {
      // Few accumulators: sum code value x activation over the block, then scale the block's sum
      // once (two multiplies fewer per 32 weights than scaling each decoded weight).
      __m512 part[R][B];
      for (int r = 0; r < R; ++r)
        for (int b = 0; b < B; ++b) part[r][b] = _mm512_setzero_ps();
      for (; k < seg_end; k += 32) {
        __m512 we[R], wo[R];
        for (int r = 0; r < R; ++r) {
          if ((k & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(w[r] + (k >> 1) + R * (K / 2)), _MM_HINT_T1);
          const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w[r] + (k >> 1))));
          we[r] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
          wo[r] = _mm512_permutexvar_ps(_mm512_and_si512(v, nib), table);
        }
        for (int b = 0; b < B; ++b) {
          const float* xb = xf + b * K + k;
          const __m512 xe = _mm512_loadu_ps(xb), xo = _mm512_loadu_ps(xb + 16);
          for (int r = 0; r < R; ++r) {
            part[r][b] = _mm512_fmadd_ps(we[r], xe, part[r][b]);
            part[r][b] = _mm512_fmadd_ps(wo[r], xo, part[r][b]);
          }
        }
      }
      for (int r = 0; r < R; ++r)
        for (int b = 0; b < B; ++b) acc[r][b] = _mm512_fmadd_ps(part[r][b], scale[r], acc[r][b]);
      continue;
    }
    for (; k < seg_end; k += 32) {
      __m512 we[R], wo[R];
      for (int r = 0; r < R; ++r) {
        if ((k & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(w[r] + (k >> 1) + R * (K / 2)), _MM_HINT_T1);
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w[r] + (k >> 1))));
        we[r] = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table), scale[r]);
        wo[r] = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(v, nib), table), scale[r]);
      }
      for (int b = 0; b < B; ++b) {
        const float* xb = xf + b * K + k;
        const __m512 xe = _mm512_loadu_ps(xb), xo = _mm512_loadu_ps(xb + 16);
        for (int r = 0; r < R; ++r) {
          acc[r][b] = _mm512_fmadd_ps(we[r], xe, acc[r][b]);
          acc[r][b] = _mm512_fmadd_ps(wo[r], xo, acc[r][b]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) park[r * B + b] = acc[r][b];
}

// The two AVX-512 inner kernels, each a span over K of R rows for B activations (parked partial sums
// in and out), with what the tiling driver needs to know about them.
struct SpanF32 {
  using X = float;
  // A nested absmax decoded inline, per block (block_absmax): decoding it per row group (rows_avx512)
  // made this path 3-5% faster with a nested absmax and 8-10% slower with a float32 one (Xeon, one
  // thread, 576x576 and 1536x576), so it keeps the inline decode.
  static constexpr bool kDecodeGroups = false;
  static constexpr int rows(int) { return 4; }
  static constexpr int first_part(int b) { return b <= 4 ? b : 4; }
  static int64_t x_stride(const Gemv4bitArgs& a) { return a.in_features; }
  // B * chunk floats = 32 KB of x; any multiple of 32 (a span may cut a block: its part is scaled alone).
  static int64_t chunk(const Gemv4bitArgs&, int B) { return std::max<int64_t>(32, (8192 / B) / 32 * 32); }
  template <int B, int R>
  QM_TARGET_AVX512 static void span(const Gemv4bitArgs& a, const float* x, int64_t o, int64_t k0, int64_t k1,
                                    __m512* park, bool first) {
    tile_span_avx512<B, R>(a, x, o, k0, k1, park, first);
  }
};

// Rows g0..g1 (rows g0 - first .. g1 - first of a) for a batch of B activations, each tile of R rows swept
// over K in chunks of x that stay in L1, partial sums parked between chunks (park1, park2: the two parts).
template <int B, class Span>
QM_TARGET_AVX512 inline void group_avx512(const Gemv4bitArgs& a, const typename Span::X* x, int64_t first, int64_t g0,
                                          int64_t g1, __m512* park1, __m512* park2) {
  constexpr int B1 = Span::first_part(B), B2 = B - B1;
  constexpr int R = Span::rows(B1);
  const typename Span::X* x2 = x + B1 * Span::x_stride(a);  // second half of the batch
  const int64_t K = a.in_features, chunk = Span::chunk(a, B);
  for (int64_t kc = 0; kc < K; kc += chunk) {
    const int64_t kend = std::min(K, kc + chunk);
    int64_t o = g0;
    for (; o + R <= g1; o += R) {
      Span::template span<B1, R>(a, x, o - first, kc, kend, park1 + (o - g0) * B1, kc == 0);
      if constexpr (B2 > 0) Span::template span<B2, R>(a, x2, o - first, kc, kend, park2 + (o - g0) * B2, kc == 0);
    }
    for (; o < g1; ++o) {
      Span::template span<B1, 1>(a, x, o - first, kc, kend, park1 + (o - g0) * B1, kc == 0);
      if constexpr (B2 > 0) Span::template span<B2, 1>(a, x2, o - first, kc, kend, park2 + (o - g0) * B2, kc == 0);
    }
  }
}

// Rows o0..o1 for a batch of B activations, run whole or split into two parts (Span::first_part: the
// f32 path splits above 4, AVX512-BF16 above 6): R rows x the part's activations keep their
// accumulators plus the decoded weights in registers, and a second part re-reads the same weight bytes
// from L1 instead of memory. Rows go in groups of kGroup (group_avx512).
//
// Where the span asks for it (Span::kDecodeGroups), a nested absmax is decoded for a whole group at once
// (group_absmax) and the group's spans read it as a float32 absmax, through args whose rows start at
// the group's first row (ga).
template <int B, class Span>
QM_TARGET_AVX512 void rows_avx512(const Gemv4bitArgs& a, const void* xv, int64_t o0, int64_t o1) {
  constexpr int B1 = Span::first_part(B), B2 = B - B1;
  constexpr int64_t kGroup = kAbsmaxRows;  // rows whose partial sums are parked between K chunks
  static_assert(kGroup % Span::rows(B1) == 0, "row groups are whole tiles");
  const auto* x = static_cast<const typename Span::X*>(xv);
  const bool decode = Span::kDecodeGroups && a.absmax == nullptr;
  alignas(64) __m512 park1[kGroup * B1];
  alignas(64) __m512 park2[kGroup * (B2 > 0 ? B2 : 1)];
  std::vector<float> decoded;
  Gemv4bitArgs ga = a;
  for (int64_t g0 = o0; g0 < o1; g0 += kGroup) {
    const int64_t g1 = std::min(o1, g0 + kGroup);
    if (decode) {
      ga.packed = a.packed + g0 * (a.in_features / 2);
      ga.absmax = group_absmax(a, g0, g1, decoded);
      group_avx512<B, Span>(ga, x, g0, g0, g1, park1, park2);
    } else {
      group_avx512<B, Span>(a, x, 0, g0, g1, park1, park2);
    }
    for (int64_t o = g0; o < g1; ++o) {
      for (int b = 0; b < B1; ++b) store_y(a, b * a.out_features + o, _mm512_reduce_add_ps(park1[(o - g0) * B1 + b]));
      for (int b = 0; b < B2; ++b) {
        store_y(a, (B1 + b) * a.out_features + o, _mm512_reduce_add_ps(park2[(o - g0) * B2 + b]));
      }
    }
  }
}

// ---- AVX512-BF16 ----
//
// Decode without widening: a 64-byte load holds 128 codes; 16-bit word j holds the nibbles of elements
// 4j (bits 4-7), 4j+1 (bits 0-3), 4j+2 (bits 12-15) and 4j+3 (bits 8-11). vpermw reads only the low 5
// bits of each index word, so with the 16 code values stored twice (a 32-word table) the word itself,
// and the word shifted right by 4, 8 and 12, look up elements 4j+1, 4j, 4j+3 and 4j+2: four permutes
// and three shifts per 128 weights, no zero-extension or mask. x is prepared once per call in the same
// order (kBf16Lanes below), in bfloat16, and padded with zeros to a multiple of 128; vdpbf16ps then
// sums pairs of word lanes into 16 float32 lanes. Lanes 0-7 cover elements 0..63 of the group and lanes
// 8-15 elements 64..127, so with blocksize 64 one group holds two blocks and is scaled lane-wise.
constexpr int64_t kBf16Group = 128;
constexpr int kBf16Lanes[4] = {1, 0, 3, 2};  // x vector m of a group: element 4j + kBf16Lanes[m] in word j

int64_t bf16_x_stride(int64_t K) { return (K + kBf16Group - 1) / kBf16Group * kBf16Group; }

// x -> [batch][bf16_x_stride(K)] words, each 128-group as 4 vectors of 32 words, zero padded.
void prepare_x_bf16dot(const Gemv4bitArgs& a, std::vector<uint16_t, CacheLineAllocator<uint16_t>>& xb) {
  const int64_t K = a.in_features, Kp = bf16_x_stride(K);
  const uint16_t* x = static_cast<const uint16_t*>(a.x);
  xb.assign(static_cast<size_t>(a.batch * Kp), 0);
  for (int64_t b = 0; b < a.batch; ++b) {
    for (int64_t g = 0; g < K; g += kBf16Group) {
      for (int m = 0; m < 4; ++m) {
        for (int64_t j = 0; j < 32 && g + 4 * j < K; ++j) {
          xb[static_cast<size_t>(b * Kp + g + 32 * m + j)] = x[b * K + g + 4 * j + kBf16Lanes[m]];
        }
      }
    }
  }
}

// Sums of code value x activation over one group of 128 (or the last 64) weights, for R rows and B
// activations, into part[r][b][0..C-1]: C = 2 chains per accumulator when R x B is small, so enough
// vdpbf16ps are in flight to hide their latency.
//
// Each row also prefetches the same 64 bytes of the row R further on (the next tile) into L2: the
// hardware prefetcher alone does not run far enough ahead of R interleaved row streams, and weights
// that come from DRAM ran at ~2/3 of the speed of L3-resident ones (Zen 4, 1 thread: 14336x4096 B=1
// 3.2 ms -> 1.9 ms). Past the weight's end the prefetch is a no-op.
template <int B, int R, int C>
QM_TARGET_AVX512BF16 inline void group_bf16dot(const uint8_t* const* w, int64_t row_bytes, const uint16_t* x,
                                               int64_t stride, int64_t k, bool half, __m512i table,
                                               __m512 (&part)[R][B][C]) {
  __m512i v[R];
  for (int r = 0; r < R; ++r) {
    const uint8_t* p = w[r] + k / 2;
    _mm_prefetch(reinterpret_cast<const char*>(p + R * row_bytes), _MM_HINT_T1);
    // The last group of a row with K % 128 == 64: 32 bytes; the zero codes meet zero-padded x.
    v[r] = half ? _mm512_maskz_loadu_epi8(0xFFFFFFFFull, p) : _mm512_loadu_si512(p);
  }
  // x vector m of every activation is loaded once and feeds the R rows' decoded vectors m.
  for (int m = 0; m < 4; ++m) {
    __m512bh d[R];
    for (int r = 0; r < R; ++r) {
      const __m512i idx = m == 0 ? v[r] : _mm512_srli_epi16(v[r], 4 * m);
      d[r] = (__m512bh)_mm512_permutexvar_epi16(idx, table);
    }
    for (int b = 0; b < B; ++b) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + b * stride + k + 32 * m);
      for (int r = 0; r < R; ++r) part[r][b][m % C] = _mm512_dpbf16_ps(part[r][b][m % C], d[r], xv);
    }
  }
}

struct SpanBf16Dot {
  using X = uint16_t;
  // A nested absmax decoded per row group (rows_avx512): 10-13% faster than per span and row.
  static constexpr bool kDecodeGroups = true;
  // Rows per tile: R x B partial sums (1 or 2 chains), their scaled sums (up to 4 activations) and R
  // decoded vectors in 32 registers. Up to 6 activations run as one batch (more than 4: the scaled sums
  // accumulate in park, see span); 7 and 8 as two halves of at most 4 (the second half re-decodes the
  // tile's weights from L1: measured faster than one pass at 7 and 8 on Zen 4).
  static constexpr int rows(int b) { return b == 1 || b == 2 ? 4 : 2; }
  static constexpr int first_part(int b) { return b <= 6 ? b : 4; }
  static int64_t x_stride(const Gemv4bitArgs& a) { return bf16_x_stride(a.in_features); }
  // Whole scale segments (a block, or a group of two 64-blocks) per chunk; B * chunk words ~ 128 KB of
  // x, read from L2: on Zen 4 faster than chunks of 32 KB (L1, which the weight stream shares), e.g.
  // 4096x14336 at batch 4 3.75 -> 3.4 ms, and a row of K <= 16384 then streams whole up to batch 4.
  static int64_t chunk(const Gemv4bitArgs& a, int B) {
    const int64_t seg = std::max(a.blocksize, kBf16Group);
    return std::max<int64_t>(1, (65536 / B) / seg) * seg;
  }
  // Rows o..o+R over [k0, k1) (k0 a multiple of the segment): per segment the code value x activation
  // sums of a block are scaled once by its float32 absmax (lane-wise for two 64-blocks) into acc; a
  // nested absmax arrives decoded (rows_avx512).
  template <int B, int R>
  QM_TARGET_AVX512BF16 static void span(const Gemv4bitArgs& a, const uint16_t* x, int64_t o, int64_t k0,
                                        int64_t k1, __m512* park, bool first) {
    const int64_t K = a.in_features, bs = a.blocksize, bpr = K / bs, stride = bf16_x_stride(K);
    const int64_t seg = std::max(bs, kBf16Group);
    const int log2_bs = __builtin_ctzll(static_cast<unsigned long long>(bs));  // blocksize: a power of two
    // The 16 code values rounded to bfloat16 (vcvtneps2bf16: to nearest even), stored twice.
    const __m256i codes = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(a.quant_map));
    const __m512i table = _mm512_inserti64x4(_mm512_castsi256_si512(codes), codes, 1);
    // blocksize 64: lanes 0-7 of a group's sums take the first block's absmax, lanes 8-15 the second's.
    const __m512i pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const uint8_t* w[R];
    for (int r = 0; r < R; ++r) w[r] = a.packed + (o + r) * (K / 2);
    // More than 4 activations: R x B partial sums fill the registers, so the scaled sums accumulate
    // in park (L1) instead, and the whole batch shares each decoded weight vector.
    constexpr bool kParked = B > 4;
    __m512 acc[kParked ? 1 : R][kParked ? 1 : B];
    if constexpr (kParked) {
      if (first)
        for (int i = 0; i < R * B; ++i) park[i] = _mm512_setzero_ps();
    } else {
      for (int r = 0; r < R; ++r)
        for (int b = 0; b < B; ++b) acc[r][b] = first ? _mm512_setzero_ps() : park[r * B + b];
    }
    constexpr int C = R * B >= 8 ? 1 : 2;
    const int64_t nb = (k1 - k0) >> log2_bs;
    const float* sc[R];
    for (int r = 0; r < R; ++r) sc[r] = a.absmax + (o + r) * bpr + (k0 >> log2_bs);
    for (int64_t k = k0; k < k1; k += seg) {
      __m512 part[R][B][C];
      for (int r = 0; r < R; ++r)
        for (int b = 0; b < B; ++b)
          for (int c = 0; c < C; ++c) part[r][b][c] = _mm512_setzero_ps();
      const int64_t end = std::min(k1, k + seg);
      for (int64_t g = k; g < end; g += kBf16Group) {
        group_bf16dot<B, R, C>(w, K / 2, x, stride, g, g + kBf16Group > K, table, part);
      }
      const int64_t j = (k - k0) >> log2_bs;
      for (int r = 0; r < R; ++r) {
        __m512 scale;
        // blocksize 64: lanes 8-15 belong to the next block (none after a row's last 64 elements).
        if (bs < kBf16Group && j + 1 < nb) {
          const __m128 two = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(sc[r] + j)));
          scale = _mm512_permutexvar_ps(pair, _mm512_castps128_ps512(two));
        } else {
          scale = _mm512_set1_ps(sc[r][j]);
        }
        for (int b = 0; b < B; ++b) {
          const __m512 sum = C == 1 ? part[r][b][0] : _mm512_add_ps(part[r][b][0], part[r][b][C - 1]);
          if constexpr (kParked) {
            park[r * B + b] = _mm512_fmadd_ps(sum, scale, park[r * B + b]);
          } else {
            acc[r][b] = _mm512_fmadd_ps(sum, scale, acc[r][b]);
          }
        }
      }
    }
    if constexpr (!kParked) {
      for (int r = 0; r < R; ++r)
        for (int b = 0; b < B; ++b) park[r * B + b] = acc[r][b];
    }
  }
};

// ---- AVX2 with 16-bit x: integer dot products ----
//
// The f32 AVX2 path spends 12 shuffles on every 32 weights to look up four byte planes of a float
// table, and shuffles are what AVX2 CPUs have least of (one port on Intel, two on AMD). Here the table
// holds the code values as integers c = round(q * kI16Scale / max|q|) in two byte planes, and x holds
// each 64-element chunk as integers round(x * kI16Scale / max|chunk|) (prepare_x_i16): 64 weights cost
// 4 lookups and 4 byte unpacks, then 4 vpmaddwd multiply 16-bit pairs exactly and add them into int32.
// Bounds: |c|, |x| <= 16383, and a lane of the int32 sum of one chunk holds 8 products, so it stays
// below 8 * 16383^2 < 2^31. Each chunk's sum is converted to float32 and scaled by its x step
// (max|chunk| / 16383), each block's by its absmax, the row's total divided by the code scale once.
//
// What it changes against the f32 product (tests/error_bounds.py derives the bound): each code value is
// off by at most half a table step (max|q| / 32766), and each x element by at most half an x step, half
// of 1/16383 of its chunk's largest magnitude (15 bits below it; a bfloat16 element holds 8). x that is
// not finite, or a chunk whose largest magnitude is below 2^-100 but not zero, takes the f32 path
// (prepare_x_i16 says so).

// Element j (0..63) of a chunk sits at the int16 lane the kernel multiplies it in: the high nibbles
// (even j) look up vectors 0-1 and the low ones (odd j) vectors 2-3; byte unpacks take bytes 0-7 of
// each 128-bit lane into the first vector and bytes 8-15 into the second.
inline int64_t i16_lane(int64_t j) {
  const int64_t byte = j / 2, lane = byte / 16, in_lane = byte % 16;
  return 16 * (2 * (j % 2) + in_lane / 8) + 8 * lane + in_lane % 8;
}

// x as integers per chunk: max|chunk| and a finiteness check 8 elements at a time, then
// round(x * r) with r = float32(16383 / max|chunk|) (vcvtps2dq: to nearest even), so each integer is
// within 0.5 + 2^-9 of x * 16383 / max|chunk| (two float32 roundings of a value <= 16383; a product
// of x = max|chunk| stays below 16383.5), placed in the kernel's lane order (i16_lane). Scalar code
// with float64 took 3-5 µs of a 1536-wide call on Zen 3, as long as a small layer's GEMV itself.
// False: x needs the f32 path.
template <DType DT>
QM_TARGET_AVX2 bool prepare_x_i16_typed(const Gemv4bitArgs& a, GemvX& x) {
  const int64_t K = a.in_features, chunks = K / kI16Chunk;
  static const auto lanes = [] {
    std::array<uint8_t, kI16Chunk> t{};
    for (int64_t j = 0; j < kI16Chunk; ++j) t[static_cast<size_t>(j)] = static_cast<uint8_t>(i16_lane(j));
    return t;
  }();
  x.i16.resize(static_cast<size_t>(a.batch * K));
  x.i16_step.resize(static_cast<size_t>(a.batch * chunks));
  const auto* src = static_cast<const uint16_t*>(a.x);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i exponent = _mm256_set1_epi32(0x7F800000);
  for (int64_t c = 0; c < a.batch * chunks; ++c) {  // chunk c of the batch's rows laid end to end
    const uint16_t* xs = src + c * kI16Chunk;
    __m256 v[8], amax = _mm256_setzero_ps();
    __m256i special = _mm256_setzero_si256();  // exponent all ones: Inf or NaN
    for (int m = 0; m < 8; ++m) {
      v[m] = load8_avx2<DT>(xs, 8 * m);
      const __m256i bits = _mm256_castps_si256(v[m]);
      special = _mm256_or_si256(special, _mm256_cmpeq_epi32(_mm256_and_si256(bits, exponent), exponent));
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[m]));
    }
    if (!_mm256_testz_si256(special, special)) return false;
    const float top = hmax_avx2(amax);
    if (top != 0.0f && top < 0x1p-100f) return false;
    const __m256 r = _mm256_set1_ps(top == 0.0f ? 0.0f : static_cast<float>(kI16Scale / double{top}));
    alignas(32) int32_t q[kI16Chunk];
    for (int m = 0; m < 8; ++m) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(q + 8 * m), _mm256_cvtps_epi32(_mm256_mul_ps(v[m], r)));
    }
    int16_t* dst = x.i16.data() + c * kI16Chunk;
    for (int64_t j = 0; j < kI16Chunk; ++j) dst[lanes[static_cast<size_t>(j)]] = static_cast<int16_t>(q[j]);
    x.i16_step[static_cast<size_t>(c)] = static_cast<float>(double{top} / kI16Scale);
  }
  return true;
}

QM_TARGET_AVX2 bool prepare_x_i16(const Gemv4bitArgs& a, GemvX& x) {
  return a.x_dtype == DType::F16 ? prepare_x_i16_typed<DType::F16>(a, x) : prepare_x_i16_typed<DType::BF16>(a, x);
}

// The code table as two byte planes of int16 values, and the scale it was made with; false when the
// quant_map has a value that is not finite or is all zeros (its rows take the f32 path).
struct TableI16 {
  __m256i lo, hi;
  float scale;
};

QM_TARGET_AVX2 inline bool table_i16(const float* quant_map, TableI16& t) {
  float qmax = 0.0f;
  for (int i = 0; i < 16; ++i) {
    if (!std::isfinite(quant_map[i])) return false;
    qmax = std::max(qmax, std::fabs(quant_map[i]));
  }
  if (qmax == 0.0f) return false;
  t.scale = static_cast<float>(kI16Scale / double{qmax});
  alignas(32) uint8_t lo[32], hi[32];
  for (int i = 0; i < 16; ++i) {
    const auto c = static_cast<uint16_t>(static_cast<int16_t>(std::lrint(double{quant_map[i]} * t.scale)));
    lo[i] = lo[i + 16] = static_cast<uint8_t>(c & 0xFF);
    hi[i] = hi[i + 16] = static_cast<uint8_t>(c >> 8);
  }
  t.lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo));
  t.hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
  return true;
}

// Rows o0..o1 for B <= 4 activations (x rows xi[b * K], steps[b * K / 64]): each row's codes are read
// once per call of this function. Per block, B float32 sums of chunk sums times their x step; per row,
// B sums of block sums times absmax, broadcast from memory (scales[(o - o0) * bpr + blk]: a broadcast
// of a register is one more shuffle per block, a ninth per 64 weights at blocksize 64).
template <int B>
QM_TARGET_AVX2 void rows_i16_part(const Gemv4bitArgs& a, const TableI16& t, const int16_t* xi, const float* steps,
                                  const float* scales, int64_t b0, int64_t o0, int64_t o1) {
  const int64_t K = a.in_features, bs = a.blocksize, bpr = K / bs, chunks = K / kI16Chunk;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* w = a.packed + o * (K / 2);
    const float* sc = scales + (o - o0) * bpr;
    __m256 acc[B];
    for (int b = 0; b < B; ++b) acc[b] = _mm256_setzero_ps();
    for (int64_t blk = 0; blk < bpr; ++blk) {
      __m256 part[B];
      for (int b = 0; b < B; ++b) part[b] = _mm256_setzero_ps();
      for (int64_t k = blk * bs; k < (blk + 1) * bs; k += kI16Chunk) {
        if ((k & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (k >> 1) + kAvx2Ahead), _MM_HINT_T0);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (k >> 1)));
        const __m256i even = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4), odd = _mm256_and_si256(v, m4);
        const __m256i el = _mm256_shuffle_epi8(t.lo, even), eh = _mm256_shuffle_epi8(t.hi, even);
        const __m256i ol = _mm256_shuffle_epi8(t.lo, odd), oh = _mm256_shuffle_epi8(t.hi, odd);
        const __m256i c[4] = {_mm256_unpacklo_epi8(el, eh), _mm256_unpackhi_epi8(el, eh), _mm256_unpacklo_epi8(ol, oh),
                              _mm256_unpackhi_epi8(ol, oh)};
        for (int b = 0; b < B; ++b) {
          const __m256i* xv = reinterpret_cast<const __m256i*>(xi + (b0 + b) * K + k);
          __m256i s = _mm256_madd_epi16(c[0], _mm256_load_si256(xv));
          for (int m = 1; m < 4; ++m) s = _mm256_add_epi32(s, _mm256_madd_epi16(c[m], _mm256_load_si256(xv + m)));
          const __m256 step = _mm256_broadcast_ss(steps + (b0 + b) * chunks + k / kI16Chunk);
          part[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), step, part[b]);
        }
      }
      const __m256 scale = _mm256_broadcast_ss(sc + blk);
      for (int b = 0; b < B; ++b) acc[b] = _mm256_fmadd_ps(part[b], scale, acc[b]);
    }
    for (int b = 0; b < B; ++b) store_y(a, (b0 + b) * a.out_features + o, hsum_avx2(acc[b]) / t.scale);
  }
}

// Rows go 16 at a time: their absmax decoded first where nested (group_absmax), and batches
// above 4 as two parts over the same rows, the second re-reading the rows' codes from L1 (4
// accumulators and 4 partial sums per part fit AVX2's 16 registers).
template <int B>
QM_TARGET_AVX2 void rows_i16(const Gemv4bitArgs& a, const TableI16& t, const GemvX& x, int64_t o0, int64_t o1) {
  constexpr int B1 = B <= 4 ? B : 4, B2 = B - B1;
  std::vector<float> decoded;
  for (int64_t g = o0; g < o1; g += kAbsmaxRows) {
    const int64_t g1 = std::min(o1, g + kAbsmaxRows);
    const float* scales = group_absmax(a, g, g1, decoded);
    rows_i16_part<B1>(a, t, x.i16.data(), x.i16_step.data(), scales, 0, g, g1);
    if constexpr (B2 > 0) rows_i16_part<B2>(a, t, x.i16.data(), x.i16_step.data(), scales, B1, g, g1);
  }
}

#endif  // QM_X86

using RowsFn = void (*)(const Gemv4bitArgs&, const void*, int64_t, int64_t);

// avx512bf16 with bfloat16 x and blocksize >= 64 (one scale per 64 lanes at least) takes the vdpbf16ps
// path; every other avx512bf16 call runs the exact AVX-512 path.
bool use_bf16dot(const Gemv4bitArgs& a, Isa isa) {
  return QM_X86 && isa == Isa::AVX512BF16 && a.x_dtype == DType::BF16 && a.blocksize >= 64;
}

// AVX2 with bfloat16 or float16 x and blocksize >= 64 (whole 64-element chunks per block) takes the
// integer path where x allows it (prepare_x_i16); float32 x keeps the exact f32 path.
bool use_i16(const Gemv4bitArgs& a, Isa isa) {
  return QM_X86 && isa == Isa::AVX2 && a.x_dtype != DType::F32 && a.blocksize >= kI16Chunk;
}

RowsFn pick_rows(const Gemv4bitArgs& a, Isa isa) {
  const int64_t batch = a.batch;
#if QM_X86
  static constexpr RowsFn bf16dot[] = {
      rows_avx512<1, SpanBf16Dot>, rows_avx512<2, SpanBf16Dot>, rows_avx512<3, SpanBf16Dot>,
      rows_avx512<4, SpanBf16Dot>, rows_avx512<5, SpanBf16Dot>, rows_avx512<6, SpanBf16Dot>,
      rows_avx512<7, SpanBf16Dot>, rows_avx512<8, SpanBf16Dot>};
  static constexpr RowsFn avx512[] = {rows_avx512<1, SpanF32>, rows_avx512<2, SpanF32>, rows_avx512<3, SpanF32>,
                                      rows_avx512<4, SpanF32>, rows_avx512<5, SpanF32>, rows_avx512<6, SpanF32>,
                                      rows_avx512<7, SpanF32>, rows_avx512<8, SpanF32>};
  static constexpr RowsFn avx2[] = {rows_avx2<1>, rows_avx2<2>, rows_avx2<3>, rows_avx2<4>,
                                    rows_avx2<5>, rows_avx2<6>, rows_avx2<7>, rows_avx2<8>};
  if (use_bf16dot(a, isa)) return bf16dot[batch - 1];
  if (isa == Isa::AVX512 || isa == Isa::AVX512BF16) return avx512[batch - 1];
  if (isa == Isa::AVX2) return avx2[batch - 1];
#else
  (void)isa;
  (void)batch;
#endif
  return rows_scalar;
}

}  // namespace

namespace {

void check_args(const Gemv4bitArgs& args) {
  const int64_t K = args.in_features, bs = args.blocksize;
  if (bs < 32 || bs > 4096 || (bs & (bs - 1)) != 0) {
    throw std::invalid_argument("blocksize " + std::to_string(bs) + " is not supported");
  }
  if (K <= 0 || K % bs != 0) {
    throw std::invalid_argument("in_features " + std::to_string(K) + " is not a multiple of blocksize " +
                                std::to_string(bs) + ": the fused GEMV needs whole blocks per row");
  }
  if (args.batch < 1 || args.batch > kGemvMaxBatch) {
    throw std::invalid_argument("batch " + std::to_string(args.batch) + " is outside 1..8");
  }
}

}  // namespace

void gemv_prepare_x(const Gemv4bitArgs& args, Isa isa, GemvX& x) {
  x.path = GemvX::Path::F32;
#if QM_X86
  if (use_bf16dot(args, isa)) {
    x.path = GemvX::Path::Bf16Dot;
    return prepare_x_bf16dot(args, x.bf16);
  }
  if (use_i16(args, isa) && prepare_x_i16(args, x)) {
    x.path = GemvX::Path::I16;
    return;
  }
#endif
  const int64_t group = isa == Isa::AVX512 || isa == Isa::AVX512BF16 ? 32 : isa == Isa::AVX2 ? kQuads : 2;
  widen_dispatch(args, group, x.f32);
}

void gemv_rows(const Gemv4bitArgs& args, const GemvX& x, int64_t o0, int64_t o1, Isa isa) {
#if QM_X86
  if (x.path == GemvX::Path::I16) {
    static constexpr void (*i16[])(const Gemv4bitArgs&, const TableI16&, const GemvX&, int64_t, int64_t) = {
        rows_i16<1>, rows_i16<2>, rows_i16<3>, rows_i16<4>, rows_i16<5>, rows_i16<6>, rows_i16<7>, rows_i16<8>};
    TableI16 t;
    if (table_i16(args.quant_map, t)) return i16[args.batch - 1](args, t, x, o0, o1);
    // A quant_map the integer table cannot hold: these rows take the f32 path on x widened here.
    GemvX wide;
    widen_dispatch(args, kQuads, wide.f32);
    return pick_rows(args, isa)(args, wide.f32.data(), o0, o1);
  }
#endif
  const void* xp = x.path == GemvX::Path::Bf16Dot ? static_cast<const void*>(x.bf16.data()) : x.f32.data();
  pick_rows(args, isa)(args, xp, o0, o1);
}

void gemv_4bit(const Gemv4bitArgs& args, Isa isa, int threads) {
  check_args(args);
  isa = resolve_isa_full(isa);
  GemvX x;
  gemv_prepare_x(args, isa, x);
  // Grain 16 rows: a multiple of every tile height.
  parallel_for(args.out_features, threads, 16, [&](int64_t o0, int64_t o1) { gemv_rows(args, x, o0, o1, isa); });
}

void gemv_4bit_multi(const std::vector<Gemv4bitArgs>& segments, Isa isa, int threads) {
  if (segments.empty()) return;
  const Gemv4bitArgs& a0 = segments[0];
  check_args(a0);
  for (size_t i = 1; i < segments.size(); ++i) {
    const Gemv4bitArgs& a = segments[i];
    if (a.x != a0.x || a.x_dtype != a0.x_dtype || a.batch != a0.batch || a.in_features != a0.in_features ||
        a.blocksize != a0.blocksize) {
      throw std::invalid_argument("weight " + std::to_string(i) + " has in_features " +
                                  std::to_string(a.in_features) + ", blocksize " + std::to_string(a.blocksize) +
                                  " but weight 0 has " + std::to_string(a0.in_features) + ", " +
                                  std::to_string(a0.blocksize) + ": the weights of one call share x and K");
    }
  }
  isa = resolve_isa_full(isa);
  GemvX x;
  gemv_prepare_x(a0, isa, x);  // the same for every segment: they share x, dtype, K and blocksize
  // Each weight's rows padded to a multiple of 16: chunks (multiples of 16 from 0) then start every
  // weight's row ranges at multiples of 16, as gemv_4bit's own chunks do, so rows tile the same way.
  std::vector<int64_t> start(segments.size() + 1, 0);
  for (size_t i = 0; i < segments.size(); ++i) start[i + 1] = start[i] + (segments[i].out_features + 15) / 16 * 16;
  parallel_for(start.back(), threads, 16, [&](int64_t r0, int64_t r1) {
    for (size_t i = 0; i < segments.size(); ++i) {
      const int64_t o0 = std::max(r0, start[i]) - start[i];
      const int64_t o1 = std::min({r1 - start[i], segments[i].out_features});
      if (o0 < o1) gemv_rows(segments[i], x, o0, o1, isa);
    }
  });
}

}  // namespace qm
