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

// This lane's share of R dot products x . W_r (rows of 4-bit codes at wp[r], their absmax at ap[r]),
// sharing each widened x word between the R rows: the lane takes chunks sub, sub + 8, ... of 32
// weights, sums quant_map[q] * x over a chunk with float32 FMAs and adds that sum times the chunk's
// absmax. The next chunk's bytes and absmax are loaded while the current one is multiplied.
template <typename T, int R>
__device__ __forceinline__ void lane_dots(const T* __restrict__ xr, const uint8_t* const (&wp)[R],
                                          const float* const (&ap)[R], const float* s_qm, int64_t K, int log2bs,
                                          int sub, float (&acc)[R]) {
  const int64_t chunks = K >> 5;
  int64_t c = sub;
  uint4 w_next[R];
  float a_next[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    w_next[r] = make_uint4(0, 0, 0, 0);
    a_next[r] = 0.0f;
    if (c < chunks) {
      w_next[r] = __ldcs(reinterpret_cast<const uint4*>(wp[r]) + c);
      a_next[r] = __ldg(ap[r] + ((c << 5) >> log2bs));
    }
  }
  for (; c < chunks; c += kLanesPerRow) {
    uint4 w[R];
    float am[R], part[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      w[r] = w_next[r];
      am[r] = a_next[r];
      part[r] = 0.0f;
      if (c + kLanesPerRow < chunks) {
        w_next[r] = __ldcs(reinterpret_cast<const uint4*>(wp[r]) + c + kLanesPerRow);
        a_next[r] = __ldg(ap[r] + (((c + kLanesPerRow) << 5) >> log2bs));
      }
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {  // 4 words of 8 codes
      float xv[8];
      x8(xr, c * 32 + q * 8, xv);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint32_t word = q == 0 ? w[r].x : q == 1 ? w[r].y : q == 2 ? w[r].z : w[r].w;
#pragma unroll
        for (int j = 0; j < 4; ++j) {  // byte j: element 2j in the high nibble, 2j+1 in the low one
          part[r] = __fmaf_rn(s_qm[(word >> (8 * j + 4)) & 15u], xv[2 * j], part[r]);
          part[r] = __fmaf_rn(s_qm[(word >> (8 * j)) & 15u], xv[2 * j + 1], part[r]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = __fmaf_rn(am[r], part[r], acc[r]);
  }
}

// Sum over the 8 lanes of a row, fixed butterfly order; every lane gets the sum. All 32 lanes of the
// warp must call it (no lane may have returned).
__device__ __forceinline__ float row_sum(float v) {
#pragma unroll
  for (int off = kLanesPerRow / 2; off >= 1; off >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

__device__ __forceinline__ float nan_f() { return __int_as_float(0x7fc00000); }

// The 16 code values into shared memory, read by every thread of the CTA after the barrier (all threads
// must call it).
__device__ __forceinline__ void load_quant_map(const float* __restrict__ quant_map, float* s_qm) {
  if (threadIdx.x < 16) s_qm[threadIdx.x] = __ldg(quant_map + threadIdx.x);
  __syncthreads();
}

__device__ __forceinline__ float load_weight(const void* w, int dtype, int64_t i) {
  if (dtype == kF32) return __ldg(static_cast<const float*>(w) + i);
  if (dtype == kF16) return __half2float(static_cast<const __half*>(w)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(w)[i]);
}

// silu(g) * u in float32: g / (1 + exp(-g)) then the product, each operation rounded once.
__device__ __forceinline__ float silu_mul(float g, float u) {
  return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);
}

// y[g, row] = x[g / x_share] . W_ids[g][row]
template <typename T>
__global__ void __launch_bounds__(kThreads)
k_gemv_grouped(const T* __restrict__ x, int64_t x_share, const int64_t* __restrict__ ids, int64_t experts,
               const uint8_t* __restrict__ packed, int64_t packed_stride, const float* __restrict__ absmax,
               int64_t absmax_stride, const float* __restrict__ quant_map, T* __restrict__ y, int64_t N,
               int64_t K, int log2bs) {
  __shared__ float s_qm[16];
  load_quant_map(quant_map, s_qm);
  const int64_t g = blockIdx.y;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerCta + threadIdx.x / kLanesPerRow;
  const int sub = threadIdx.x % kLanesPerRow;
  const int64_t e = __ldg(ids + g);
  const bool live = row < N, known = e >= 0 && e < experts;
  float acc[1] = {0.0f};
  if (live && known) {  // no early return: every lane takes part in the shuffles below
    const uint8_t* const wp[1] = {packed + e * packed_stride + ((row * K) >> 1)};
    const float* const ap[1] = {absmax + e * absmax_stride + ((row * K) >> log2bs)};
    lane_dots<T, 1>(x + (g / x_share) * K, wp, ap, s_qm, K, log2bs, sub, acc);
  }
  const float s = row_sum(acc[0]);
  if (live && sub == 0) y[g * N + row] = Elem<T>::from(known ? s : nan_f());
}

// Decode's first projection with its activation: h[g, r] = silu(x . Wg_r) * (x . Wu_r), r < I, where the
// expert's gate rows are rows 0..I-1 of its gate_up region and its up rows I..2I-1.
template <typename T>
__global__ void __launch_bounds__(kThreads)
k_gemv_grouped_glu(const T* __restrict__ x, int64_t x_share, const int64_t* __restrict__ ids, int64_t experts,
                   const uint8_t* __restrict__ packed, int64_t packed_stride, const float* __restrict__ absmax,
                   int64_t absmax_stride, const float* __restrict__ quant_map, T* __restrict__ h, int64_t I,
                   int64_t K, int log2bs) {
  __shared__ float s_qm[16];
  load_quant_map(quant_map, s_qm);
  const int64_t g = blockIdx.y;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerCta + threadIdx.x / kLanesPerRow;
  const int sub = threadIdx.x % kLanesPerRow;
  const int64_t e = __ldg(ids + g);
  const bool live = row < I, known = e >= 0 && e < experts;
  float acc[2] = {0.0f, 0.0f};
  if (live && known) {
    const uint8_t* base = packed + e * packed_stride;
    const float* abase = absmax + e * absmax_stride;
    const uint8_t* const wp[2] = {base + ((row * K) >> 1), base + (((I + row) * K) >> 1)};
    const float* const ap[2] = {abase + ((row * K) >> log2bs), abase + (((I + row) * K) >> log2bs)};
    lane_dots<T, 2>(x + (g / x_share) * K, wp, ap, s_qm, K, log2bs, sub, acc);
  }
  const float gate = row_sum(acc[0]), up = row_sum(acc[1]);
  if (live && sub == 0) h[g * I + row] = Elem<T>::from(known ? silu_mul(gate, up) : nan_f());
}

// Decode's second projection and the routing sum: y[t, row] = sum_j w[t, j] * (h[t k + j] . W_ids[t k + j][row]).
// The 32 eight-lane slots of a CTA take (row, j) pairs, rows_per_cta = 32 / k rows of one token t, so a
// CTA streams k experts' rows at once (as many bytes in flight as the plain kernel); the k float32 dot
// products meet in shared memory and one thread per row adds them, weighted, in slot order (j = 0..k-1)
// and rounds once to T. k <= 32.
template <typename T>
__global__ void __launch_bounds__(kThreads)
k_gemv_grouped_sum(const T* __restrict__ h, int k, const int64_t* __restrict__ ids, int64_t experts,
                   const void* __restrict__ weights, int w_dtype, const uint8_t* __restrict__ packed,
                   int64_t packed_stride, const float* __restrict__ absmax, int64_t absmax_stride,
                   const float* __restrict__ quant_map, T* __restrict__ y, int64_t N, int64_t K, int log2bs) {
  __shared__ float s_qm[16];
  __shared__ float s_dot[kRowsPerCta];
  __shared__ int s_known[kRowsPerCta];
  load_quant_map(quant_map, s_qm);
  const int rows_per_cta = kRowsPerCta / k;
  const int64_t t = blockIdx.y;
  const int slot = threadIdx.x / kLanesPerRow, sub = threadIdx.x % kLanesPerRow;
  const int local = slot / k, j = slot % k;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_cta + local;
  const bool live = local < rows_per_cta && row < N;
  const int64_t g = t * k + j;
  const int64_t e = live ? __ldg(ids + g) : 0;
  const bool known = e >= 0 && e < experts;
  float part[1] = {0.0f};
  if (live && known) {  // no early return: every lane takes part in the shuffles below
    const uint8_t* const wp[1] = {packed + e * packed_stride + ((row * K) >> 1)};
    const float* const ap[1] = {absmax + e * absmax_stride + ((row * K) >> log2bs)};
    lane_dots<T, 1>(h + g * K, wp, ap, s_qm, K, log2bs, sub, part);
  }
  const float dot = row_sum(part[0]);
  if (sub == 0) {
    s_dot[slot] = dot;
    s_known[slot] = known ? 1 : 0;
  }
  __syncthreads();
  if (threadIdx.x < rows_per_cta) {
    const int64_t r = static_cast<int64_t>(blockIdx.x) * rows_per_cta + threadIdx.x;
    if (r < N) {
      float acc = 0.0f;
      bool all = true;
      for (int i = 0; i < k; ++i) {
        acc = __fmaf_rn(load_weight(weights, w_dtype, t * k + i), s_dot[threadIdx.x * k + i], acc);
        all = all && s_known[threadIdx.x * k + i] != 0;
      }
      y[t * N + r] = Elem<T>::from(all ? acc : nan_f());
    }
  }
}

// One thread per 32 weights (16 bytes): out[i, j .. j+31] of expert ids[i].
template <typename T>
__global__ void __launch_bounds__(kThreads)
k_dequantize_grouped(const int64_t* __restrict__ ids, int64_t experts, const uint8_t* __restrict__ packed,
                     int64_t packed_stride, const float* __restrict__ absmax, int64_t absmax_stride,
                     const float* __restrict__ quant_map, T* __restrict__ out, int64_t n, int log2bs) {
  __shared__ float s_qm[16];
  load_quant_map(quant_map, s_qm);
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

// The layer's expert buffers as one launch sees them (host side).
struct ExpertsArg {
  const int64_t* ids;
  int64_t experts;
  const uint8_t* packed;
  int64_t ps;  // packed stride (bytes per expert)
  const float* absmax;
  int64_t as;  // absmax stride (floats per expert)
  const float* qm;
};

ExpertsArg experts_arg(uintptr_t ids, int64_t experts, uintptr_t packed, int64_t ps, uintptr_t absmax, int64_t as,
                       uintptr_t quant_map) {
  return ExpertsArg{reinterpret_cast<const int64_t*>(ids), experts, reinterpret_cast<const uint8_t*>(packed), ps,
                    reinterpret_cast<const float*>(absmax), as, reinterpret_cast<const float*>(quant_map)};
}

constexpr int64_t kMaxGridY = 65535;

// The element types the kernels are instantiated for (dispatch's cases).
bool valid_dtype(int dtype) { return dtype == kF32 || dtype == kF16 || dtype == kBF16; }

// Checks shared by the GEMV entry points: rows [rows, K] of whole blocks, every expert's rows inside its
// stride, 16-byte aligned x and codes.
int check_gemv(int dtype, int blocksize, int64_t grid_y, int64_t rows, int64_t K, const ExpertsArg& a,
               uintptr_t x) {
  if (!valid_blocksize(blocksize)) return kBadBlocksize;
  if (!valid_dtype(dtype)) return kBadDtype;
  if (grid_y < 0 || grid_y > kMaxGridY || rows < 0 || K <= 0 || K % blocksize != 0 || a.experts < 1 ||
      (rows > 0 && K > (int64_t{1} << 40) / rows) || rows / kRowsPerCta >= (int64_t{1} << 30))
    return kBadSize;
  if (a.ps < rows * K / 2 || a.as < rows * (K / blocksize) || a.ps % 16 != 0 || !aligned16(x) ||
      !aligned16(reinterpret_cast<uintptr_t>(a.packed)))
    return kBadSize;
  return kOk;
}

unsigned tiles(int64_t rows, int64_t per) { return static_cast<unsigned>((rows + per - 1) / per); }

template <typename T>
void launch_plain(const void* x, int64_t groups, int64_t x_share, int64_t N, int64_t K, int l, const ExpertsArg& a,
                  void* y, cudaStream_t st) {
  k_gemv_grouped<T><<<dim3(tiles(N, kRowsPerCta), static_cast<unsigned>(groups)), kThreads, 0, st>>>(
      static_cast<const T*>(x), x_share, a.ids, a.experts, a.packed, a.ps, a.absmax, a.as, a.qm, static_cast<T*>(y),
      N, K, l);
}

template <typename T>
void launch_glu(const void* x, int64_t groups, int64_t x_share, int64_t I, int64_t K, int l, const ExpertsArg& a,
                void* h, cudaStream_t st) {
  k_gemv_grouped_glu<T><<<dim3(tiles(I, kRowsPerCta), static_cast<unsigned>(groups)), kThreads, 0, st>>>(
      static_cast<const T*>(x), x_share, a.ids, a.experts, a.packed, a.ps, a.absmax, a.as, a.qm, static_cast<T*>(h),
      I, K, l);
}

template <typename T>
void launch_sum(const void* h, int64_t tokens, int k, const void* w, int w_dtype, int64_t N, int64_t K, int l,
                const ExpertsArg& a, void* y, cudaStream_t st) {
  k_gemv_grouped_sum<T><<<dim3(tiles(N, kRowsPerCta / k), static_cast<unsigned>(tokens)), kThreads, 0, st>>>(
      static_cast<const T*>(h), k, a.ids, a.experts, w, w_dtype, a.packed, a.ps, a.absmax, a.as, a.qm,
      static_cast<T*>(y), N, K, l);
}

template <typename T>
void launch_dequantize(const ExpertsArg& a, int64_t count, int64_t n, int l, void* out, cudaStream_t st) {
  k_dequantize_grouped<T><<<dim3(tiles(n >> 5, kThreads), static_cast<unsigned>(count)), kThreads, 0, st>>>(
      a.ids, a.experts, a.packed, a.ps, a.absmax, a.as, a.qm, static_cast<T*>(out), n, l);
}

// Run launcher<T> for the dtype code, then collect the launch error.
template <template <typename> class L, typename... Args>
int dispatch(int dtype, Args&&... args) {
  switch (dtype) {
    case kF32: L<float>::run(args...); break;
    case kF16: L<__half>::run(args...); break;
    default: L<__nv_bfloat16>::run(args...); break;
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T> struct Plain { template <typename... A> static void run(A... a) { launch_plain<T>(a...); } };
template <typename T> struct Glu { template <typename... A> static void run(A... a) { launch_glu<T>(a...); } };
template <typename T> struct Sum { template <typename... A> static void run(A... a) { launch_sum<T>(a...); } };
template <typename T> struct Deq { template <typename... A> static void run(A... a) { launch_dequantize<T>(a...); } };

}  // namespace

int gemv_4bit_grouped(int device, uintptr_t x, int dtype, int64_t groups, int64_t x_share, int64_t N, int64_t K,
                      int blocksize, uintptr_t ids, int64_t experts, uintptr_t packed, int64_t packed_stride,
                      uintptr_t absmax, int64_t absmax_stride, uintptr_t quant_map, uintptr_t y, uintptr_t stream) {
  const ExpertsArg a = experts_arg(ids, experts, packed, packed_stride, absmax, absmax_stride, quant_map);
  if (int s = check_gemv(dtype, blocksize, groups, N, K, a, x); s != kOk) return s;
  if (x_share < 1) return kBadSize;
  if (groups == 0 || N == 0) return kOk;
  if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) return static_cast<int>(e);
  return dispatch<Plain>(dtype, reinterpret_cast<const void*>(x), groups, x_share, N, K, ilog2(blocksize), a,
                         reinterpret_cast<void*>(y), reinterpret_cast<cudaStream_t>(stream));
}

int gemv_4bit_grouped_glu(int device, uintptr_t x, int dtype, int64_t groups, int64_t x_share, int64_t I, int64_t K,
                          int blocksize, uintptr_t ids, int64_t experts, uintptr_t packed, int64_t packed_stride,
                          uintptr_t absmax, int64_t absmax_stride, uintptr_t quant_map, uintptr_t h,
                          uintptr_t stream) {
  const ExpertsArg a = experts_arg(ids, experts, packed, packed_stride, absmax, absmax_stride, quant_map);
  if (int s = check_gemv(dtype, blocksize, groups, 2 * I, K, a, x); s != kOk) return s;
  if (x_share < 1) return kBadSize;
  if (groups == 0 || I == 0) return kOk;
  if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) return static_cast<int>(e);
  return dispatch<Glu>(dtype, reinterpret_cast<const void*>(x), groups, x_share, I, K, ilog2(blocksize), a,
                       reinterpret_cast<void*>(h), reinterpret_cast<cudaStream_t>(stream));
}

int gemv_4bit_grouped_sum(int device, uintptr_t h, int dtype, int64_t tokens, int k, int64_t N, int64_t K,
                          int blocksize, uintptr_t ids, int64_t experts, uintptr_t weights, int w_dtype,
                          uintptr_t packed, int64_t packed_stride, uintptr_t absmax, int64_t absmax_stride,
                          uintptr_t quant_map, uintptr_t y, uintptr_t stream) {
  const ExpertsArg a = experts_arg(ids, experts, packed, packed_stride, absmax, absmax_stride, quant_map);
  if (int s = check_gemv(dtype, blocksize, tokens, N, K, a, h); s != kOk) return s;
  if (k < 1 || k > kRowsPerCta || tokens * k > (int64_t{1} << 40)) return kBadSize;
  if (!valid_dtype(w_dtype)) return kBadDtype;
  if (tokens == 0 || N == 0) return kOk;
  if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) return static_cast<int>(e);
  return dispatch<Sum>(dtype, reinterpret_cast<const void*>(h), tokens, k, reinterpret_cast<const void*>(weights),
                       w_dtype, N, K, ilog2(blocksize), a, reinterpret_cast<void*>(y),
                       reinterpret_cast<cudaStream_t>(stream));
}

int dequantize_4bit_grouped(int device, uintptr_t ids, int64_t count, int64_t experts, uintptr_t packed,
                            int64_t packed_stride, uintptr_t absmax, int64_t absmax_stride, int64_t n,
                            int blocksize, uintptr_t quant_map, int out_dtype, uintptr_t out, uintptr_t stream) {
  if (!valid_blocksize(blocksize)) return kBadBlocksize;
  if (!valid_dtype(out_dtype)) return kBadDtype;
  if (count < 0 || count > kMaxGridY || n < 0 || n % 32 != 0 || experts < 1 || n > (int64_t{1} << 40) ||
      packed_stride < n / 2 || absmax_stride < (n + blocksize - 1) / blocksize || packed_stride % 16 != 0 ||
      !aligned16(packed) || !aligned16(out))
    return kBadSize;
  if (count == 0 || n == 0) return kOk;
  if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) return static_cast<int>(e);
  const ExpertsArg a = experts_arg(ids, experts, packed, packed_stride, absmax, absmax_stride, quant_map);
  return dispatch<Deq>(out_dtype, a, count, n, ilog2(blocksize), reinterpret_cast<void*>(out),
                       reinterpret_cast<cudaStream_t>(stream));
}

}  // namespace cuda
}  // namespace qm
