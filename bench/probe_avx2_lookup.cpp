// The AVX2 4-bit GEMV's table lookup, three ways, one thread, cache-resident (blocksize 64):
// - "planes": the f32 path's step_avx2 in csrc/gemv_cpu.cpp (the float32 table as four byte planes, one
//   vpshufb each for 32 codes, then byte and word unpacks: 12 shuffles per 32 weights; x in that
//   kernel's quad order);
// - "perm": two vpermps (the table's halves) and a blendv on the code's high bit per 8 weights, the
//   nibbles spread with variable shifts (x in natural order; its sum is checked against float64);
// - "i16": csrc/gemv_cpu.cpp's rows_i16 (16-bit x): code values as 15-bit integers in two byte planes,
//   x as 15-bit integers per 64-chunk, vpmaddwd (8 shuffles per 64 weights); its sum is checked too.
// Round 49, AMD EPYC (Zen 5), 1536x576: planes 12.7 G weights/s, perm 10.9. Round 51, AMD EPYC (Zen 3,
// AVX2 only), 1536x576 / 576x1536 / 576x576: planes 7.7 / 8.2 / 7.8, perm 5.3 / 5.6 / 5.3, i16 15.0 /
// 17.1 / 15.4 G weights/s.
// Build and run:
//   g++ -O3 -o /tmp/probe_avx2_lookup bench/probe_avx2_lookup.cpp && /tmp/probe_avx2_lookup
#include <immintrin.h>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>
#include <chrono>
#include <cmath>
#include <algorithm>
#include <random>
static const float NF4[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};
struct Planes { __m256i b[4]; };
__attribute__((target("avx2,fma"))) Planes planes() {
  alignas(32) uint8_t bytes[4][32];
  for (int i = 0; i < 16; ++i) { uint32_t u; memcpy(&u, NF4 + i, 4); for (int j = 0; j < 4; ++j) bytes[j][i] = bytes[j][i + 16] = (uint8_t)(u >> (8 * j)); }
  Planes p; for (int j = 0; j < 4; ++j) p.b[j] = _mm256_load_si256((const __m256i*)bytes[j]); return p;
}
// current: x permuted (quads); here we just time it, ignoring order correctness
__attribute__((noinline, target("avx2,fma"))) float rows_planes(const uint8_t* W, const float* x, const float* absmax, int O, int K, int bs) {
  Planes t = planes(); float tot = 0;
  for (int o = 0; o < O; ++o) {
    const uint8_t* w = W + (size_t)o * K / 2; __m256 acc = _mm256_setzero_ps();
    for (int blk = 0; blk < K / bs; ++blk) {
      __m256 p[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int k = blk * bs; k < (blk + 1) * bs; k += 32) {
        const __m128i v = _mm_loadu_si128((const __m128i*)(w + (k >> 1)));
        const __m128i m4 = _mm_set1_epi8(0x0F);
        const __m256i idx = _mm256_set_m128i(_mm_and_si128(v, m4), _mm_and_si128(_mm_srli_epi16(v, 4), m4));
        const __m256i b0 = _mm256_shuffle_epi8(t.b[0], idx), b1 = _mm256_shuffle_epi8(t.b[1], idx);
        const __m256i b2 = _mm256_shuffle_epi8(t.b[2], idx), b3 = _mm256_shuffle_epi8(t.b[3], idx);
        const __m256i l01 = _mm256_unpacklo_epi8(b0, b1), h01 = _mm256_unpackhi_epi8(b0, b1);
        const __m256i l23 = _mm256_unpacklo_epi8(b2, b3), h23 = _mm256_unpackhi_epi8(b2, b3);
        const __m256 f[4] = {_mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23)), _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23)),
                             _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23)), _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23))};
        for (int m = 0; m < 4; ++m) p[m] = _mm256_fmadd_ps(f[m], _mm256_loadu_ps(x + k + 8 * m), p[m]);
      }
      __m256 s = _mm256_add_ps(_mm256_add_ps(p[0], p[1]), _mm256_add_ps(p[2], p[3]));
      acc = _mm256_fmadd_ps(s, _mm256_set1_ps(absmax[o * (K / bs) + blk]), acc);
    }
    float r[8]; _mm256_storeu_ps(r, acc); for (int i = 0; i < 8; ++i) tot += r[i];
  }
  return tot;
}
// vpermps: natural x order
__attribute__((noinline, target("avx2,fma"))) float rows_perm(const uint8_t* W, const float* x, const float* absmax, int O, int K, int bs) {
  const __m256 tlo = _mm256_loadu_ps(NF4), thi = _mm256_loadu_ps(NF4 + 8);
  const __m256i sh = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24), sl = _mm256_setr_epi32(24, 28, 16, 20, 8, 12, 0, 4);
  float tot = 0;
  for (int o = 0; o < O; ++o) {
    const uint8_t* w = W + (size_t)o * K / 2; __m256 acc = _mm256_setzero_ps();
    for (int blk = 0; blk < K / bs; ++blk) {
      __m256 p[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int k = blk * bs; k < (blk + 1) * bs; k += 32) {
        for (int m = 0; m < 4; ++m) {
          int32_t d; memcpy(&d, w + (k >> 1) + 4 * m, 4);
          const __m256i v = _mm256_set1_epi32(d);
          const __m256i idx = _mm256_srlv_epi32(v, sh);
          const __m256 sel = _mm256_castsi256_ps(_mm256_sllv_epi32(v, sl));
          const __m256 f = _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, idx), _mm256_permutevar8x32_ps(thi, idx), sel);
          p[m] = _mm256_fmadd_ps(f, _mm256_loadu_ps(x + k + 8 * m), p[m]);
        }
      }
      __m256 s = _mm256_add_ps(_mm256_add_ps(p[0], p[1]), _mm256_add_ps(p[2], p[3]));
      acc = _mm256_fmadd_ps(s, _mm256_set1_ps(absmax[o * (K / bs) + blk]), acc);
    }
    float r[8]; _mm256_storeu_ps(r, acc); for (int i = 0; i < 8; ++i) tot += r[i];
  }
  return tot;
}
// i16: x as integers per 64-chunk in the kernel's lane order (rows_i16 / i16_lane), one step per chunk
constexpr int S = 16383;
int i16_lane(int j) { int b = j / 2, lane = b / 16, in = b % 16; return 16 * (2 * (j % 2) + in / 8) + 8 * lane + in % 8; }
void prep_i16(const float* x, int K, int16_t* xi, float* step) {
  for (int c = 0; c < K / 64; ++c) {
    float am = 0; for (int e = 0; e < 64; ++e) am = std::max(am, std::fabs(x[c * 64 + e]));
    double r = am > 0 ? S / (double)am : 0; step[c] = am / S;
    for (int e = 0; e < 64; ++e) xi[c * 64 + i16_lane(e)] = (int16_t)std::lrint(x[c * 64 + e] * r);
  }
}
__attribute__((noinline, target("avx2,fma"))) float rows_i16(const uint8_t* W, const int16_t* xi, const float* step, const float* absmax, int O, int K, int bs) {
  alignas(32) uint8_t lo[32], hi[32];
  for (int i = 0; i < 16; ++i) { int16_t c = (int16_t)std::lrint(NF4[i] * S); lo[i] = lo[i + 16] = (uint8_t)(c & 255); hi[i] = hi[i + 16] = (uint8_t)((uint16_t)c >> 8); }
  const __m256i tlo = _mm256_load_si256((const __m256i*)lo), thi = _mm256_load_si256((const __m256i*)hi), m4 = _mm256_set1_epi8(0x0F);
  float tot = 0;
  for (int o = 0; o < O; ++o) {
    const uint8_t* w = W + (size_t)o * K / 2; __m256 acc = _mm256_setzero_ps();
    for (int blk = 0; blk < K / bs; ++blk) {
      __m256 part = _mm256_setzero_ps();
      for (int k = blk * bs; k < (blk + 1) * bs; k += 64) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(w + (k >> 1)));
        const __m256i e = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4), d = _mm256_and_si256(v, m4);
        const __m256i el = _mm256_shuffle_epi8(tlo, e), eh = _mm256_shuffle_epi8(thi, e), ol = _mm256_shuffle_epi8(tlo, d), oh = _mm256_shuffle_epi8(thi, d);
        const __m256i* xv = (const __m256i*)(xi + k);
        __m256i s = _mm256_madd_epi16(_mm256_unpacklo_epi8(el, eh), _mm256_load_si256(xv));
        s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_unpackhi_epi8(el, eh), _mm256_load_si256(xv + 1)));
        s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_unpacklo_epi8(ol, oh), _mm256_load_si256(xv + 2)));
        s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_unpackhi_epi8(ol, oh), _mm256_load_si256(xv + 3)));
        part = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_broadcast_ss(step + (k >> 6)), part);
      }
      acc = _mm256_fmadd_ps(part, _mm256_set1_ps(absmax[o * (K / bs) + blk]), acc);
    }
    float r[8]; _mm256_storeu_ps(r, acc); for (int i = 0; i < 8; ++i) tot += r[i];
  }
  return tot / S;
}
// reference (natural order) for the perm and i16 methods
double ref(const uint8_t* W, const float* x, const float* absmax, int O, int K, int bs) {
  double tot = 0;
  for (int o = 0; o < O; ++o) for (int k = 0; k < K; k += 2) { uint8_t b = W[(size_t)o * K / 2 + k / 2]; float a = absmax[o * (K / bs) + k / bs];
    tot += (double)x[k] * NF4[b >> 4] * a + (double)x[k + 1] * NF4[b & 15] * a; }
  return tot;
}
void run(int O, int K) {
  const int bs = 64;
  std::vector<uint8_t> W((size_t)O * K / 2); std::vector<float> x(K), am(O * K / bs), step(K / 64);
  std::vector<int16_t, std::allocator<int16_t>> xs(K + 16);
  int16_t* xi = (int16_t*)(((uintptr_t)xs.data() + 31) & ~(uintptr_t)31);  // 32-byte aligned loads
  std::mt19937 g(0); for (auto& b : W) b = g() & 255; for (auto& v : x) v = (g() % 2000) / 1000.0f - 1; for (auto& v : am) v = (g() % 1000) / 1000.0f;
  prep_i16(x.data(), K, xi, step.data());
  printf("%dx%d: ref %.4f perm %.4f i16 %.4f\n", O, K, ref(W.data(), x.data(), am.data(), O, K, bs), rows_perm(W.data(), x.data(), am.data(), O, K, bs),
         rows_i16(W.data(), xi, step.data(), am.data(), O, K, bs));
  const char* names[3] = {"planes", "perm  ", "i16   "};
  for (int rep = 0; rep < 3; ++rep) {
    for (int which = 0; which < 3; ++which) {
      auto s = std::chrono::steady_clock::now(); float t = 0;
      for (int i = 0; i < 200; ++i) {
        asm volatile("" ::: "memory");
        t += which == 2 ? rows_i16(W.data(), xi, step.data(), am.data(), O, K, bs)
             : which ? rows_perm(W.data(), x.data(), am.data(), O, K, bs) : rows_planes(W.data(), x.data(), am.data(), O, K, bs);
      }
      double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - s).count() / 200;
      printf("  %s %.1f us per GEMV (%.2f Gweights/s) %g\n", names[which], us, O * (double)K / us / 1e3, t);
    }
  }
}
int main() { run(1536, 576); run(576, 1536); run(576, 576); }
