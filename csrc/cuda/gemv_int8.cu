// Fused LLM.int8 GEMV / small-batch GEMM on CUDA: y[b, o] = sum_k x[b, k] * W[o, k], b < B (1..8),
// W[o, k] = codes[o, k] * SCB[o] / 127. The semantics of the CPU kernel (csrc/int8_cpu.cpp gemv_int8):
// exact products x * q summed in float32 (order differs: tolerance-tested), the row sum scaled once by
// f32(SCB[o] * f32(1/127)), one round-to-nearest-even cast to x's dtype; an optional bias is then added
// as torch's `y + bias` does it (both widened to float32, one add, one cast), so fusing it changes no bit.
//
// Memory-bound: every weight byte is read once, with 16-byte streaming loads (__ldcs: no reuse);
// x (B * K elements, reused by every row) goes through L1 with __ldg.
//
//   k_gemv_int8<T, B, R, U>  K % 16 == 0, x and codes 16-byte aligned. One warp per R consecutive rows;
//                            a lane takes 16 codes (one uint4) of each row per chunk, U chunks per
//                            iteration (U * R independent 16-byte loads in flight before the first
//                            use). Each x vector is widened once and used by the R rows (R = 4 for
//                            B >= 3 keeps x's L1 traffic below the weight traffic x 4).
//   k_gemv_int8_generic<T>   any K and alignment: one warp per row, one code per lane per step.
//
// int8 -> float32 without I2F (a quarter-rate conversion on sm_80/sm_90): byte b + 128 is placed in
// the low mantissa bits of 2^23 with one PRMT, and 2^23 + 128 subtracted: exact, b in [-128, 127].
#include "common.cuh"
#include "gemv_int8.h"

namespace qm {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr uint32_t kInv127Bits = 0x3C010204u;  // f32(1/127), bnb's dequantize constant
constexpr float kMagic = 8388736.0f;            // 2^23 + 128

// The 4 signed codes of a 32-bit word (byte j = code j, little-endian) as exact float32 values.
__device__ __forceinline__ void codes_to_float(uint32_t word, float* w) {
  const uint32_t u = word ^ 0x80808080u;  // signed b -> unsigned b + 128, per byte
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    // bytes {0x4B, 0x00, 0x00, u_j}: the float32 2^23 + (b_j + 128)
    w[j] = __fsub_rn(__uint_as_float(__byte_perm(u, 0x4Bu, 0x4550u | j)), kMagic);
  }
}

// 8 consecutive elements of x from element `off` (16-byte aligned) as float32 (exact widening).
template <typename T>
__device__ __forceinline__ void load_x8(const T* __restrict__ x, int64_t off, float* v) {
  const uint4* p = reinterpret_cast<const uint4*>(x + off);
  if constexpr (sizeof(T) == 4) {
    const uint4 a = __ldg(p);
    const uint4 b = __ldg(p + 1);
    widen16(a, v, x);
    widen16(b, v + 4, x);
  } else {
    widen16(__ldg(p), v, x);
  }
}

// The output element: T(acc * f32(SCB * f32(1/127))), then T(that + bias) when there is a bias.
template <typename T>
__device__ __forceinline__ T finish(float acc, float scb, const T* __restrict__ bias, int64_t o) {
  const float scale = __fmul_rn(scb, __uint_as_float(kInv127Bits));
  T out = Elem<T>::from(__fmul_rn(acc, scale));
  if (bias != nullptr) out = Elem<T>::from(__fadd_rn(Elem<T>::load(&out), Elem<T>::load(bias + o)));
  return out;
}

template <typename T, int B, int R, int U>
__global__ void __launch_bounds__(kThreads)
k_gemv_int8(const T* __restrict__ x,          // [B, K]
            const int8_t* __restrict__ codes,  // [N, K]
            const float* __restrict__ scb,     // [N]
            const T* __restrict__ bias,        // [N] or null
            T* __restrict__ y,                 // [B, N]
            int64_t N, int64_t K) {
  const int lane = threadIdx.x & 31;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5)) * R;
  if (row0 >= N) return;
  const int nrows = static_cast<int>(N - row0 < R ? N - row0 : R);
  const int64_t chunks = K >> 4;  // 16 codes = 16 bytes per chunk

  float acc[R][B];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int b = 0; b < B; ++b) acc[r][b] = 0.0f;

  for (int64_t c0 = lane; c0 < chunks; c0 += 32 * U) {
    // All U x R weight loads first: they are independent and in flight together.
    uint4 w[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = c0 + 32 * u;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        w[u][r] = (c < chunks && r < nrows) ? __ldcs(reinterpret_cast<const uint4*>(codes + (row0 + r) * K) + c)
                                            : make_uint4(0u, 0u, 0u, 0u);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = c0 + 32 * u;
      if (c >= chunks) break;  // x past the row is never read
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // 8 codes (two words) of each row at a time
        float wf[R][8];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          codes_to_float(h == 0 ? w[u][r].x : w[u][r].z, wf[r]);
          codes_to_float(h == 0 ? w[u][r].y : w[u][r].w, wf[r] + 4);
        }
#pragma unroll
        for (int b = 0; b < B; ++b) {
          float xv[8];
          load_x8(x, b * K + c * 16 + h * 8, xv);  // widened once, used by all R rows
#pragma unroll
          for (int r = 0; r < R; ++r)
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[r][b] = __fmaf_rn(wf[r][i], xv[i], acc[r][b]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int b = 0; b < B; ++b) acc[r][b] = warp_sum(acc[r][b]);  // every lane holds every sum
  // R * B <= 32 results: lane r * B + b writes (row0 + r, b).
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int b = 0; b < B; ++b) {
      if (lane == r * B + b && r < nrows) {
        const int64_t o = row0 + r;
        y[b * N + o] = finish<T>(acc[r][b], __ldg(scb + o), bias, o);
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
k_gemv_int8_generic(const T* __restrict__ x, const int8_t* __restrict__ codes, const float* __restrict__ scb,
                    const T* __restrict__ bias, T* __restrict__ y, int B, int64_t N, int64_t K) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= N) return;
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t k = lane; k < K; k += 32) {
    const float w = static_cast<float>(codes[row * K + k]);  // exact
#pragma unroll
    for (int b = 0; b < 8; ++b)
      if (b < B) acc[b] = __fmaf_rn(w, Elem<T>::load(x + b * K + k), acc[b]);
  }
#pragma unroll
  for (int b = 0; b < 8; ++b) {
    if (b < B) {
      const float s = warp_sum(acc[b]);
      if (lane == 0) y[b * N + row] = finish<T>(s, __ldg(scb + row), bias, row);
    }
  }
}

struct Args {
  const void* x;
  const int8_t* codes;
  const float* scb;
  const void* bias;
  void* y;
  int64_t N, K;
  cudaStream_t st;
};

template <typename T, int B, int R, int U>
cudaError_t launch_cfg(const Args& a) {
  const int64_t rows_per_cta = kWarps * R;
  const int64_t ctas = (a.N + rows_per_cta - 1) / rows_per_cta;
  k_gemv_int8<T, B, R, U><<<static_cast<unsigned>(ctas), kThreads, 0, a.st>>>(
      static_cast<const T*>(a.x), a.codes, a.scb, static_cast<const T*>(a.bias), static_cast<T*>(a.y), a.N, a.K);
  return cudaGetLastError();
}

// Batch 1-2: 2 rows per warp, 4 chunks in flight (8 loads of 16 bytes per lane); batch 3-8: 4 rows per
// warp (x's on-chip traffic per weight byte shrinks with R), 2 chunks in flight. variant 1..4 forces a
// batch 1-2 configuration (R, U) = (1, 4), (2, 2), (4, 2), (4, 4) for bench/bench_int8_cuda.py.
template <typename T, int B>
cudaError_t launch_fast(const Args& a, int variant) {
  if constexpr (B <= 2) {
    switch (variant) {
      case 1: return launch_cfg<T, B, 1, 4>(a);
      case 2: return launch_cfg<T, B, 2, 2>(a);
      case 3: return launch_cfg<T, B, 4, 2>(a);
      case 4: return launch_cfg<T, B, 4, 4>(a);
      default: return launch_cfg<T, B, 2, 4>(a);
    }
  } else {
    return launch_cfg<T, B, 4, 2>(a);
  }
}

template <typename T>
cudaError_t launch(const Args& a, int batch, bool fast, int variant) {
  if (!fast) {
    const int64_t ctas = (a.N + kWarps - 1) / kWarps;
    k_gemv_int8_generic<T><<<static_cast<unsigned>(ctas), kThreads, 0, a.st>>>(
        static_cast<const T*>(a.x), a.codes, a.scb, static_cast<const T*>(a.bias), static_cast<T*>(a.y), batch,
        a.N, a.K);
    return cudaGetLastError();
  }
  switch (batch) {
    case 1: return launch_fast<T, 1>(a, variant);
    case 2: return launch_fast<T, 2>(a, variant);
    case 3: return launch_fast<T, 3>(a, variant);
    case 4: return launch_fast<T, 4>(a, variant);
    case 5: return launch_fast<T, 5>(a, variant);
    case 6: return launch_fast<T, 6>(a, variant);
    case 7: return launch_fast<T, 7>(a, variant);
    default: return launch_fast<T, 8>(a, variant);
  }
}

}  // namespace

int gemv_int8(int device, uintptr_t x, int dtype, int batch, int64_t N, int64_t K, uintptr_t codes,
              uintptr_t scb, uintptr_t bias, uintptr_t y, uintptr_t stream, int variant) {
  if (batch < 1 || batch > 8) return kBadBatch;
  if (N < 0 || K < 0 || (N > 0 && K > (int64_t{1} << 40) / N) || N / kWarps >= (int64_t{1} << 31)) return kBadSize;
  if (N == 0) return kOk;
  if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) return static_cast<int>(e);
  const Args a{reinterpret_cast<const void*>(x),
               reinterpret_cast<const int8_t*>(codes),
               reinterpret_cast<const float*>(scb),
               reinterpret_cast<const void*>(bias),
               reinterpret_cast<void*>(y),
               N,
               K,
               reinterpret_cast<cudaStream_t>(stream)};
  const bool fast = K % 16 == 0 && aligned16(x) && aligned16(codes);
  switch (dtype) {
    case kF32: return static_cast<int>(launch<float>(a, batch, fast, variant));
    case kF16: return static_cast<int>(launch<__half>(a, batch, fast, variant));
    case kBF16: return static_cast<int>(launch<__nv_bfloat16>(a, batch, fast, variant));
    default: return kBadDtype;
  }
}

}  // namespace cuda
}  // namespace qm
