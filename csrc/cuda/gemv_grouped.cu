// MoE kernels on CUDA (moe_cuda.h): the grouped 4-bit GEMV of decode and the grouped dequantize of
// prefill, both indexed by expert ids that live on the device.
//
// Grouped GEMV: the same arithmetic as gemv.cu's CUDA-core kernel (and the CPU grouped kernel row by
// row): a lane takes 32 weights (16 bytes) of a row per step, sums quant_map[q] * x over them with
// float32 FMAs, scales that sum by the chunk's absmax (a chunk never straddles a block: blocksize >= 32)
// and the lanes of a row add their sums in a fixed butterfly order. Grid (row tiles, groups): the
// expert of a group is read from ids[blockIdx.y], so one launch covers every routed (token, expert)
// pair of a decode step. Decode shapes are small (Qwen3-30B-A3B: 1536 x 2048 and 2048 x 768 per
// expert, 8 experts), so a row gets 8 lanes, not a warp: K = 768 is 24 chunks, 3 per lane, every lane busy.
#include "common.cuh"
#include "moe_cuda.h"

namespace qm {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kLanesPerRow = 8;
constexpr int kRowsPerCta = kThreads / kLanesPerRow;  // 32

// 8 elements of x at element offset off, widened to float32 (read-only cache: x is reused by every row).
template <typename T>
__device__ __forceinline__ void x8(const T* __restrict__ x, int64_t off, float* v) {
  const uint4* p = reinterpret_cast<const uint4*>(x + off);
  widen16(__ldg(p), v, x);
  if constexpr (sizeof(T) == 4) widen16(__ldg(p + 1), v + 4, x);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
k_gemv_grouped(const T* __restrict__ x, int64_t x_share, const int64_t* __restrict__ ids, int64_t experts,
               const uint8_t* __restrict__ packed, int64_t packed_stride, const float* __restrict__ absmax,
               int64_t absmax_stride, const float* __restrict__ quant_map, T* __restrict__ y, int64_t N,
               int64_t K, int log2bs) {
  __shared__ float s_qm[16];
  if (threadIdx.x < 16) s_qm[threadIdx.x] = __ldg(quant_map + threadIdx.x);
  __syncthreads();
  const int64_t g = blockIdx.y;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerCta + threadIdx.x / kLanesPerRow;
  const int sub = threadIdx.x % kLanesPerRow;
  const int64_t e = __ldg(ids + g);
  const bool live = row < N, known = e >= 0 && e < experts;
  float acc = 0.0f;
  if (live && known) {  // no early return: every lane takes part in the shuffles below
    const uint8_t* wp = packed + e * packed_stride + ((row * K) >> 1);
    const float* ap = absmax + e * absmax_stride + ((row * K) >> log2bs);
    const T* xr = x + (g / x_share) * K;
    const int64_t chunks = K >> 5;
    int64_t c = sub;
    uint4 w_next = make_uint4(0, 0, 0, 0);
    float a_next = 0.0f;
    if (c < chunks) {
      w_next = __ldcs(reinterpret_cast<const uint4*>(wp) + c);
      a_next = __ldg(ap + ((c << 5) >> log2bs));
    }
    for (; c < chunks; c += kLanesPerRow) {
      const uint4 w = w_next;
      const float am = a_next;
      if (c + kLanesPerRow < chunks) {  // the next chunk's bytes in flight while this one is multiplied
        w_next = __ldcs(reinterpret_cast<const uint4*>(wp) + c + kLanesPerRow);
        a_next = __ldg(ap + (((c + kLanesPerRow) << 5) >> log2bs));
      }
      float part = 0.0f;
#pragma unroll
      for (int q = 0; q < 4; ++q) {  // 4 words of 8 codes
        float xv[8];
        x8(xr, c * 32 + q * 8, xv);
        const uint32_t word = q == 0 ? w.x : q == 1 ? w.y : q == 2 ? w.z : w.w;
#pragma unroll
        for (int j = 0; j < 4; ++j) {  // byte j: element 2j in the high nibble, 2j+1 in the low one
          part = __fmaf_rn(s_qm[(word >> (8 * j + 4)) & 15u], xv[2 * j], part);
          part = __fmaf_rn(s_qm[(word >> (8 * j)) & 15u], xv[2 * j + 1], part);
        }
      }
      acc = __fmaf_rn(am, part, acc);
    }
  }
#pragma unroll
  for (int off = kLanesPerRow / 2; off >= 1; off >>= 1) acc = __fadd_rn(acc, __shfl_xor_sync(0xffffffffu, acc, off));
  if (live && sub == 0) y[g * N + row] = Elem<T>::from(known ? acc : __int_as_float(0x7fc00000));
}

// One thread per 32 weights (16 bytes): out[i, j .. j+31] of expert ids[i].
template <typename T>
__global__ void __launch_bounds__(kThreads)
k_dequantize_grouped(const int64_t* __restrict__ ids, int64_t experts, const uint8_t* __restrict__ packed,
                     int64_t packed_stride, const float* __restrict__ absmax, int64_t absmax_stride,
                     const float* __restrict__ quant_map, T* __restrict__ out, int64_t n, int log2bs) {
  __shared__ float s_qm[16];
  if (threadIdx.x < 16) s_qm[threadIdx.x] = __ldg(quant_map + threadIdx.x);
  __syncthreads();
  const int64_t i = blockIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;  // chunk of 32 weights
  if (c >= (n >> 5)) return;  // no shuffles below
  const int64_t e = __ldg(ids + i);
  T* o = out + i * n + (c << 5);
  if (e < 0 || e >= experts) {
#pragma unroll
    for (int k = 0; k < 32; ++k) o[k] = Elem<T>::from(__int_as_float(0x7fc00000));
    return;
  }
  const uint4 w = __ldcs(reinterpret_cast<const uint4*>(packed + e * packed_stride) + c);
  const float am = __ldg(absmax + e * absmax_stride + ((c << 5) >> log2bs));
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  alignas(16) T v[32];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // dequantize_4bit's decode: quant_map[q] * absmax, one rounding to T
      v[q * 8 + 2 * j] = Elem<T>::from(__fmul_rn(s_qm[(words[q] >> (8 * j + 4)) & 15u], am));
      v[q * 8 + 2 * j + 1] = Elem<T>::from(__fmul_rn(s_qm[(words[q] >> (8 * j)) & 15u], am));
    }
  }
  // 16-byte stores (out is 16-byte aligned and a row holds a multiple of 32 elements)
  constexpr int kWords = 32 * static_cast<int>(sizeof(T)) / 16;
#pragma unroll
  for (int k = 0; k < kWords; ++k) reinterpret_cast<uint4*>(o)[k] = reinterpret_cast<const uint4*>(v)[k];
}

template <typename T>
cudaError_t launch_gemv(const void* x, int64_t groups, int64_t x_share, int64_t N, int64_t K, int log2bs,
                        const int64_t* ids, int64_t experts, const uint8_t* packed, int64_t ps, const float* absmax,
                        int64_t as, const float* qm, void* y, cudaStream_t st) {
  const dim3 grid(static_cast<unsigned>((N + kRowsPerCta - 1) / kRowsPerCta), static_cast<unsigned>(groups));
  k_gemv_grouped<T><<<grid, kThreads, 0, st>>>(static_cast<const T*>(x), x_share, ids, experts, packed, ps, absmax,
                                                as, qm, static_cast<T*>(y), N, K, log2bs);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dequantize(const int64_t* ids, int64_t count, int64_t experts, const uint8_t* packed, int64_t ps,
                              const float* absmax, int64_t as, int64_t n, int log2bs, const float* qm, void* out,
                              cudaStream_t st) {
  const dim3 grid(static_cast<unsigned>(((n >> 5) + kThreads - 1) / kThreads), static_cast<unsigned>(count));
  k_dequantize_grouped<T><<<grid, kThreads, 0, st>>>(ids, experts, packed, ps, absmax, as, qm, static_cast<T*>(out),
                                                     n, log2bs);
  return cudaGetLastError();
}

constexpr int64_t kMaxGridY = 65535;

}  // namespace

int gemv_4bit_grouped(int device, uintptr_t x, int dtype, int64_t groups, int64_t x_share, int64_t N, int64_t K,
                      int blocksize, uintptr_t ids, int64_t experts, uintptr_t packed, int64_t packed_stride,
                      uintptr_t absmax, int64_t absmax_stride, uintptr_t quant_map, uintptr_t y, uintptr_t stream) {
  if (!valid_blocksize(blocksize)) return kBadBlocksize;
  if (dtype != kF32 && dtype != kF16 && dtype != kBF16) return kBadDtype;
  if (groups < 0 || groups > kMaxGridY || x_share < 1 || N < 0 || K <= 0 || K % blocksize != 0 || experts < 1 ||
      (N > 0 && K > (int64_t{1} << 40) / N) || (N + kRowsPerCta - 1) / kRowsPerCta >= (int64_t{1} << 31))
    return kBadSize;
  if (packed_stride < N * K / 2 || absmax_stride < N * (K / blocksize) || packed_stride % 16 != 0 ||
      !aligned16(x) || !aligned16(packed))
    return kBadSize;
  if (groups == 0 || N == 0) return kOk;
  if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) return static_cast<int>(e);
  const int l = ilog2(blocksize);
  const auto* idp = reinterpret_cast<const int64_t*>(ids);
  const auto* pp = reinterpret_cast<const uint8_t*>(packed);
  const auto* ap = reinterpret_cast<const float*>(absmax);
  const auto* qp = reinterpret_cast<const float*>(quant_map);
  const auto* xp = reinterpret_cast<const void*>(x);
  auto* yp = reinterpret_cast<void*>(y);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kF32: return static_cast<int>(launch_gemv<float>(xp, groups, x_share, N, K, l, idp, experts, pp,
                                                          packed_stride, ap, absmax_stride, qp, yp, st));
    case kF16: return static_cast<int>(launch_gemv<__half>(xp, groups, x_share, N, K, l, idp, experts, pp,
                                                           packed_stride, ap, absmax_stride, qp, yp, st));
    default: return static_cast<int>(launch_gemv<__nv_bfloat16>(xp, groups, x_share, N, K, l, idp, experts, pp,
                                                                  packed_stride, ap, absmax_stride, qp, yp, st));
  }
}

int dequantize_4bit_grouped(int device, uintptr_t ids, int64_t count, int64_t experts, uintptr_t packed,
                            int64_t packed_stride, uintptr_t absmax, int64_t absmax_stride, int64_t n,
                            int blocksize, uintptr_t quant_map, int out_dtype, uintptr_t out, uintptr_t stream) {
  if (!valid_blocksize(blocksize)) return kBadBlocksize;
  if (out_dtype != kF32 && out_dtype != kF16 && out_dtype != kBF16) return kBadDtype;
  if (count < 0 || count > kMaxGridY || n < 0 || n % 32 != 0 || experts < 1 || n > (int64_t{1} << 40) ||
      packed_stride < n / 2 || absmax_stride < (n + blocksize - 1) / blocksize || packed_stride % 16 != 0 ||
      !aligned16(packed) || !aligned16(out))
    return kBadSize;
  if (count == 0 || n == 0) return kOk;
  if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) return static_cast<int>(e);
  const int l = ilog2(blocksize);
  const auto* idp = reinterpret_cast<const int64_t*>(ids);
  const auto* pp = reinterpret_cast<const uint8_t*>(packed);
  const auto* ap = reinterpret_cast<const float*>(absmax);
  const auto* qp = reinterpret_cast<const float*>(quant_map);
  auto* op = reinterpret_cast<void*>(out);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  switch (out_dtype) {
    case kF32: return static_cast<int>(launch_dequantize<float>(idp, count, experts, pp, packed_stride, ap,
                                                                absmax_stride, n, l, qp, op, st));
    case kF16: return static_cast<int>(launch_dequantize<__half>(idp, count, experts, pp, packed_stride, ap,
                                                                 absmax_stride, n, l, qp, op, st));
    default: return static_cast<int>(launch_dequantize<__nv_bfloat16>(idp, count, experts, pp, packed_stride, ap,
                                                                        absmax_stride, n, l, qp, op, st));
  }
}

}  // namespace cuda
}  // namespace qm
