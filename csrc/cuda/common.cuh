// Device helpers shared by the CUDA kernels: element loads/stores, the 4-bit encoders, reductions.
//
// Exactness: this file is compiled with --fmad=false -ftz=false -prec-div=true; on top of that every
// operation on the decision and decode paths is spelled with an explicitly rounded intrinsic
// (__frcp_rn, __fmul_rn, __fadd_rn, __fsub_rn) so no flag or compiler version can change the bits.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "codebooks.h"
#include "qm_cuda.h"

namespace qm {
namespace cuda {

// The float32 threshold literals (bit-equal to csrc/codebooks.h; static_asserts in quantize.cu).
#define QM_NF4_THRESHOLDS                                                                       \
  -0x1.b239bp-1f, -0x1.38a4ep-1f, -0x1.d709p-2f, -0x1.5bd4ecp-2f, -0x1.e079d8p-3f, -0x1.1a7178p-3f, \
      -0x1.74f0e2p-5f, 0x1.45f5fep-5f, 0x1.ec90c4p-4f, 0x1.a0cfcp-3f, 0x1.2b05a8p-2f,             \
      0x1.8ea7f2p-2f, 0x1.00da08p-1f, 0x1.491b5ep-1f, 0x1.b913b4p-1f
#define QM_FP4_THRESHOLDS \
  0x1.555572p-9f, 0x1.6p-4f, 0x1.aaaaaap-3f, 0x1.2aaaaap-2f, 0x1.aaaaacp-2f, 0x1.2aaaap-1f, 0x1.aaaaaap-1f
// Unsigned FP4 code for k thresholds below |s|, one nibble per k: {0, 1, 6, 7, 4, 5, 2, 3}.
constexpr uint32_t kFP4TreeNibbles = 0x32547610u;

constexpr float kTiny = 1e-38f;  // reciprocal of max(absmax, kTiny): a zero block scales to 0, not NaN

// NF4 code of a scaled value: the number of the 15 thresholds strictly below s (ties to the lower code).
__device__ __forceinline__ uint32_t encode_nf4(float s) {
  constexpr float t[15] = {QM_NF4_THRESHOLDS};
  uint32_t c = 0;
#pragma unroll
  for (int k = 0; k < 15; ++k) c += (s > t[k]) ? 1u : 0u;
  return c;
}

// FP4 code: bnb's CUDA decision tree on |s| (strict '>' against its literals), sign bit for s < 0.
// -0.0 is not < 0 and gets the positive zero code, as in formats/reference.py.
__device__ __forceinline__ uint32_t encode_fp4(float s) {
  constexpr float t[7] = {QM_FP4_THRESHOLDS};
  const float a = fabsf(s);
  uint32_t k = 0;
#pragma unroll
  for (int j = 0; j < 7; ++j) k += (a > t[j]) ? 1u : 0u;
  return ((kFP4TreeNibbles >> (4 * k)) & 0x7u) | (s < 0.0f ? 0x8u : 0u);
}

// NF4 by table: the same code as encode_nf4 in ~8 instructions instead of 15 compares.
// Bucket k = floor(16 s + 16) (clamped to 0..31) covers [-1 + k/16, -1 + (k+1)/16); each bucket holds at
// most one threshold, and no threshold lies within 1.6e-3 of a bucket edge, so a bucket index that
// rounding moves across an edge still gives the right count. code = lo[k] + (s > thr[k]), where lo[k]
// counts the thresholds below the bucket and thr[k] is the bucket's threshold (+inf if none).
struct Nf4Bucket {
  float thr;
  uint32_t lo;
};

// Fill the 32-entry bucket table (one entry per thread 0..31); the caller synchronises after.
__device__ __forceinline__ void build_nf4_buckets(Nf4Bucket* table, int k) {
  constexpr float t[15] = {QM_NF4_THRESHOLDS};
  const float lo_edge = -1.0f + k * 0.0625f, hi_edge = -1.0f + (k + 1) * 0.0625f;  // exact in f32
  uint32_t lo = 0;
  float thr = __uint_as_float(0x7f800000u);
#pragma unroll
  for (int i = 0; i < 15; ++i) {
    lo += (t[i] < lo_edge) ? 1u : 0u;
    if (t[i] >= lo_edge && t[i] < hi_edge) thr = t[i];
  }
  table[k] = Nf4Bucket{thr, lo};
}

__device__ __forceinline__ uint32_t encode_nf4_table(float s, const Nf4Bucket* table) {
  const int k = min(max(__float2int_rz(__fmaf_rn(s, 16.0f, 16.0f)), 0), 31);
  const Nf4Bucket b = table[k];
  return b.lo + ((s > b.thr) ? 1u : 0u);
}

// FP4 by table, the same codes as encode_fp4: bucket k = floor(16 |s|) (clamped to 0..15) holds at
// most one of the 7 thresholds, none within 2.6e-3 of a bucket edge; the entry keeps the threshold
// (+inf if none) and the tree codes below / above it. The sign bit is set for s < 0 (not for -0.0).
struct Fp4Bucket {
  float thr;
  uint32_t below, above, pad;
};

__device__ __forceinline__ void build_fp4_buckets(Fp4Bucket* table, int k) {
  constexpr float t[7] = {QM_FP4_THRESHOLDS};
  const float lo_edge = k * 0.0625f, hi_edge = (k + 1) * 0.0625f;
  uint32_t lo = 0;
  float thr = __uint_as_float(0x7f800000u);
#pragma unroll
  for (int i = 0; i < 7; ++i) {
    lo += (t[i] < lo_edge) ? 1u : 0u;
    if (t[i] >= lo_edge && t[i] < hi_edge) thr = t[i];
  }
  const uint32_t hi = lo < 7 ? lo + 1 : 7;
  table[k] = Fp4Bucket{thr, (kFP4TreeNibbles >> (4 * lo)) & 7u, (kFP4TreeNibbles >> (4 * hi)) & 7u, 0u};
}

__device__ __forceinline__ uint32_t encode_fp4_table(float s, const Fp4Bucket* table) {
  const float a = fabsf(s);
  const int k = min(__float2int_rz(__fmul_rn(a, 16.0f)), 15);  // a >= 0 (NaN -> 0)
  const Fp4Bucket b = table[k];
  return ((a > b.thr) ? b.above : b.below) | (s < 0.0f ? 0x8u : 0u);
}

// Shared-memory code tables of the quantize kernel (one of them is used per instantiation).
union EncodeTables {
  Nf4Bucket nf4[32];
  Fp4Bucket fp4[16];
};

template <int QT>
__device__ __forceinline__ void build_tables(EncodeTables* t, int k) {
  if constexpr (QT == kNF4) {
    if (k < 32) build_nf4_buckets(t->nf4, k);
  } else {
    if (k < 16) build_fp4_buckets(t->fp4, k);
  }
}

template <int QT>
__device__ __forceinline__ uint32_t encode(float s, const EncodeTables* t) {
  if constexpr (QT == kNF4) return encode_nf4_table(s, t->nf4);
  else return encode_fp4_table(s, t->fp4);
}

// Element type traits: widen to float32 (exact) and narrow with round-to-nearest-even.
template <typename T> struct Elem;
template <> struct Elem<float> {
  __device__ static __forceinline__ float load(const float* p) { return *p; }
  __device__ static __forceinline__ float from(float v) { return v; }
};
template <> struct Elem<__half> {
  __device__ static __forceinline__ float load(const __half* p) { return __half2float(*p); }
  __device__ static __forceinline__ __half from(float v) { return __float2half_rn(v); }
};
template <> struct Elem<__nv_bfloat16> {
  __device__ static __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  __device__ static __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

// Widen 8 elements held in one 16-byte word (or 4 for float32) to float32.
__device__ __forceinline__ void widen16(const uint4& w, float* v, const __nv_bfloat16*) {
  const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = __uint_as_float(u[i] << 16);            // low half = first element (little-endian)
    v[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void widen16(const uint4& w, float* v, const __half*) {
  const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h = *reinterpret_cast<const __half2*>(&u[i]);
    float2 f = __half22float2(h);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void widen16(const uint4& w, float* v, const float*) {
  v[0] = __uint_as_float(w.x);
  v[1] = __uint_as_float(w.y);
  v[2] = __uint_as_float(w.z);
  v[3] = __uint_as_float(w.w);
}

// Elements of T per 16-byte word.
template <typename T> constexpr int kPerWord = 16 / sizeof(T);

// Load E consecutive elements starting at e0 as float32; elements at or past n read as 0.
// Vector path (16-byte streaming loads) when the whole run is in range and aligned.
template <typename T, int E>
__device__ __forceinline__ void load_run(const T* __restrict__ x, int64_t e0, int64_t n, bool aligned,
                                         float* v) {
  if (aligned && e0 + E <= n) {
    constexpr int W = E / kPerWord<T>;
    uint4 w[W];
    const uint4* p = reinterpret_cast<const uint4*>(x + e0);
#pragma unroll
    for (int i = 0; i < W; ++i) w[i] = __ldcs(p + i);
#pragma unroll
    for (int i = 0; i < W; ++i) widen16(w[i], v + i * kPerWord<T>, x);
  } else {
#pragma unroll
    for (int i = 0; i < E; ++i) v[i] = (e0 + i < n) ? Elem<T>::load(x + e0 + i) : 0.0f;
  }
}

// |x| of a float as an unsigned integer: for non-negative floats the integer order is the float
// order, so an integer max gives max|x| exactly, and NaN/Inf (>= 0x7f800000) cannot hide.
__device__ __forceinline__ uint32_t abs_bits(float v) { return __float_as_uint(v) & 0x7fffffffu; }
constexpr uint32_t kInfBits = 0x7f800000u;

__device__ __forceinline__ uint32_t warp_max_xor(uint32_t m, int width) {
  for (int off = width / 2; off >= 1; off >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, off));
  return m;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Nested absmax decode: map8[code] * nested_absmax + offset, a separate multiply and add.
__device__ __forceinline__ float decode_nested(const uint8_t* __restrict__ ncodes,
                                               const float* __restrict__ nabs, float offset,
                                               const float* __restrict__ map8, int64_t blk) {
  const float m = __ldg(map8 + __ldg(ncodes + blk));
  return __fadd_rn(__fmul_rn(m, __ldg(nabs + (blk >> 8))), offset);
}

__device__ __forceinline__ float nan_f() { return __int_as_float(0x7fc00000); }

// Element i of a float32 / float16 / bfloat16 array given by its DType code (the MoE routing weights).
__device__ __forceinline__ float load_weight(const void* w, int dtype, int64_t i) {
  if (dtype == kF32) return __ldg(static_cast<const float*>(w) + i);
  if (dtype == kF16) return __half2float(static_cast<const __half*>(w)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(w)[i]);
}

// silu(g) * u in float32: g / (1 + exp(-g)) then the product, each operation rounded once (the MoE
// decode kernels' activation, CUDA-core and tensor-core alike).
__device__ __forceinline__ float silu_mul(float g, float u) {
  return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);
}

inline int ilog2(int v) {
  int l = 0;
  while ((1 << l) < v) ++l;
  return l;
}
inline bool valid_blocksize(int bs) { return bs >= 32 && bs <= 4096 && (bs & (bs - 1)) == 0; }
inline bool aligned16(uintptr_t p) { return (p & 15u) == 0; }

}  // namespace cuda
}  // namespace qm
