// Fused 4-bit GEMV / small-batch GEMM: y[b, o] = sum_k x[b, k] * W[o, k], b < B (1..8).
// W is the [N, K] weight quantized over its flattened elements (blocks may cross rows). Each weight
// is decoded exactly as dequantize_4bit does (quant_map[q] * absmax, absmax decoded inline when
// nested), then multiplied into float32 accumulators (fused multiply-add on purpose: this is not a
// bit-exact path; tests use a tolerance). Packed weights, absmax and x are each read once from memory.
//
// Instantiated configurations:
//   k_gemv_fast<T, B>    T in {float, __half, __nv_bfloat16}, B in 1..8; K % 32 == 0, 16-byte aligned
//                        x and packed. One warp per 2 output rows, each lane 32 weights (16 bytes) a
//                        step with the next step's bytes already in flight.
//   k_gemv_generic<T>    any K, any alignment: one warp per row, one weight per lane per step.
#include "common.cuh"

namespace qm {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 2;  // output rows per warp in the fast kernel: x is loaded once for both

// Widen the 8 elements of x at (row b, column k) to float32 (16-bit types: one 16-byte load).
template <typename T>
__device__ __forceinline__ void load_x8(const T* __restrict__ x, int64_t off, float* v) {
  if constexpr (sizeof(T) == 4) {
    const uint4 a = __ldg(reinterpret_cast<const uint4*>(x + off));
    const uint4 b = __ldg(reinterpret_cast<const uint4*>(x + off + 4));
    widen16(a, v, x);
    widen16(b, v + 4, x);
  } else {
    const uint4 a = __ldg(reinterpret_cast<const uint4*>(x + off));
    widen16(a, v, x);
  }
}

__device__ __forceinline__ float weight_absmax(bool nested, const float* __restrict__ absmax,
                                               const uint8_t* __restrict__ nc, const float* __restrict__ na,
                                               float off, const float* __restrict__ map8, int64_t blk) {
  return nested ? decode_nested(nc, na, off, map8, blk) : __ldg(absmax + blk);
}

template <typename T, int B>
__global__ void __launch_bounds__(kThreads)
k_gemv_fast(const T* __restrict__ x,               // [B, K] activations (row-major)
            const uint8_t* __restrict__ packed,    // [N*K/2] 4-bit codes, first element high nibble
            const float* __restrict__ absmax,      // [nb] float32 (non-nested)
            const uint8_t* __restrict__ ncodes,    // [nb] nested codes (nested)
            const float* __restrict__ nabs,        // [ceil(nb/256)] nested absmax (nested)
            float offset,                          // nested offset
            const float* __restrict__ map8,        // [256] nested map (nested)
            const float* __restrict__ quant_map,   // [16] code values
            bool nested,
            T* __restrict__ y,                     // [B, N] out
            int64_t N, int64_t K, int log2bs) {
  __shared__ float s_qm[16];
  if (threadIdx.x < 16) s_qm[threadIdx.x] = quant_map[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5)) * kRows;
  if (row0 >= N) return;
  const bool has1 = row0 + 1 < N;
  const int64_t chunks = K >> 5;  // 32 weights = 16 bytes per chunk

  float acc[kRows][B];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int b = 0; b < B; ++b) acc[r][b] = 0.0f;

  const uint4* wrow0 = reinterpret_cast<const uint4*>(packed + ((row0 * K) >> 1));
  const uint4* wrow1 = reinterpret_cast<const uint4*>(packed + (((row0 + 1) * K) >> 1));
  uint4 next[kRows];
  int64_t c = lane;
  if (c < chunks) {
    next[0] = __ldcs(wrow0 + c);
    next[1] = has1 ? __ldcs(wrow1 + c) : make_uint4(0, 0, 0, 0);
  }
  for (; c < chunks; c += 32) {
    const uint4 cur[kRows] = {next[0], next[1]};
    if (c + 32 < chunks) {
      next[0] = __ldcs(wrow0 + c + 32);
      if (has1) next[1] = __ldcs(wrow1 + c + 32);
    }
    float am[kRows];
    am[0] = weight_absmax(nested, absmax, ncodes, nabs, offset, map8, (row0 * K + c * 32) >> log2bs);
    am[1] = has1 ? weight_absmax(nested, absmax, ncodes, nabs, offset, map8, ((row0 + 1) * K + c * 32) >> log2bs)
                 : 0.0f;
#pragma unroll
    for (int q = 0; q < 4; ++q) {  // 4 words of 8 codes each
      float wv[kRows][8];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const uint32_t word = q == 0 ? cur[r].x : q == 1 ? cur[r].y : q == 2 ? cur[r].z : cur[r].w;
#pragma unroll
        for (int j = 0; j < 4; ++j) {  // byte j of the word holds elements 2j (high) and 2j+1 (low)
          const uint32_t byte = (word >> (8 * j)) & 0xffu;
          wv[r][2 * j] = __fmul_rn(s_qm[byte >> 4], am[r]);
          wv[r][2 * j + 1] = __fmul_rn(s_qm[byte & 15u], am[r]);
        }
      }
#pragma unroll
      for (int b = 0; b < B; ++b) {
        float xv[8];
        load_x8(x, b * K + c * 32 + q * 8, xv);
#pragma unroll
        for (int r = 0; r < kRows; ++r)
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[r][b] = __fmaf_rn(wv[r][i], xv[i], acc[r][b]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int b = 0; b < B; ++b) acc[r][b] = warp_sum(acc[r][b]);
  if (lane == 0) {
#pragma unroll
    for (int b = 0; b < B; ++b) {
      y[b * N + row0] = Elem<T>::from(acc[0][b]);
      if (has1) y[b * N + row0 + 1] = Elem<T>::from(acc[1][b]);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
k_gemv_generic(const T* __restrict__ x, const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
               const uint8_t* __restrict__ ncodes, const float* __restrict__ nabs, float offset,
               const float* __restrict__ map8, const float* __restrict__ quant_map, bool nested,
               T* __restrict__ y, int B, int64_t N, int64_t K, int log2bs) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= N) return;
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t k = lane; k < K; k += 32) {
    const int64_t e = row * K + k;
    const uint32_t byte = packed[e >> 1];
    const uint32_t q = (e & 1) ? (byte & 15u) : (byte >> 4);
    const float w = __fmul_rn(__ldg(quant_map + q),
                              weight_absmax(nested, absmax, ncodes, nabs, offset, map8, e >> log2bs));
#pragma unroll
    for (int b = 0; b < 8; ++b)
      if (b < B) acc[b] = __fmaf_rn(w, Elem<T>::load(x + b * K + k), acc[b]);
  }
#pragma unroll
  for (int b = 0; b < 8; ++b)
    if (b < B) {
      const float s = warp_sum(acc[b]);
      if (lane == 0) y[b * N + row] = Elem<T>::from(s);
    }
}

struct GemvArgs {
  const void* x;
  const uint8_t* packed;
  const float* absmax;
  const uint8_t* nc;
  const float* na;
  float offset;
  const float* map8;
  const float* qm;
  void* y;
  int64_t N, K;
  int log2bs;
  cudaStream_t st;
};

template <typename T, int B>
cudaError_t launch_fast(const GemvArgs& a) {
  const int64_t rows_per_cta = kWarps * kRows;
  const int64_t ctas = (a.N + rows_per_cta - 1) / rows_per_cta;
  k_gemv_fast<T, B><<<static_cast<unsigned>(ctas), kThreads, 0, a.st>>>(
      static_cast<const T*>(a.x), a.packed, a.absmax, a.nc, a.na, a.offset, a.map8, a.qm, a.nc != nullptr,
      static_cast<T*>(a.y), a.N, a.K, a.log2bs);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(const GemvArgs& a, int batch, bool fast) {
  if (!fast) {
    const int64_t ctas = (a.N + kWarps - 1) / kWarps;
    k_gemv_generic<T><<<static_cast<unsigned>(ctas), kThreads, 0, a.st>>>(
        static_cast<const T*>(a.x), a.packed, a.absmax, a.nc, a.na, a.offset, a.map8, a.qm, a.nc != nullptr,
        static_cast<T*>(a.y), batch, a.N, a.K, a.log2bs);
    return cudaGetLastError();
  }
  switch (batch) {
    case 1: return launch_fast<T, 1>(a);
    case 2: return launch_fast<T, 2>(a);
    case 3: return launch_fast<T, 3>(a);
    case 4: return launch_fast<T, 4>(a);
    case 5: return launch_fast<T, 5>(a);
    case 6: return launch_fast<T, 6>(a);
    case 7: return launch_fast<T, 7>(a);
    default: return launch_fast<T, 8>(a);
  }
}

}  // namespace

int gemv_4bit(int device, uintptr_t x, int dtype, int batch, int64_t N, int64_t K, int blocksize, uintptr_t packed,
              uintptr_t absmax, uintptr_t ncodes, uintptr_t nested_absmax, float offset, uintptr_t map8,
              uintptr_t quant_map, uintptr_t y, uintptr_t stream) {
  if (!valid_blocksize(blocksize)) return kBadBlocksize;
  if (batch < 1 || batch > 8) return kBadBatch;
  if (N < 0 || K < 0 || (N > 0 && K > (int64_t{1} << 40) / N) || N / kWarps >= (int64_t{1} << 31)) return kBadSize;
  if (N == 0) return kOk;
  if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) return static_cast<int>(e);
  GemvArgs a{reinterpret_cast<const void*>(x),
             reinterpret_cast<const uint8_t*>(packed),
             reinterpret_cast<const float*>(absmax),
             reinterpret_cast<const uint8_t*>(ncodes),
             reinterpret_cast<const float*>(nested_absmax),
             offset,
             reinterpret_cast<const float*>(map8),
             reinterpret_cast<const float*>(quant_map),
             reinterpret_cast<void*>(y),
             N,
             K,
             ilog2(blocksize),
             reinterpret_cast<cudaStream_t>(stream)};
  const bool fast = K % 32 == 0 && aligned16(x) && aligned16(packed);
  switch (dtype) {
    case kF32: return static_cast<int>(launch<float>(a, batch, fast));
    case kF16: return static_cast<int>(launch<__half>(a, batch, fast));
    case kBF16: return static_cast<int>(launch<__nv_bfloat16>(a, batch, fast));
    default: return kBadDtype;
  }
}

}  // namespace cuda
}  // namespace qm
