// CUDA LLM.int8 row-wise quantize and dequantize: the same bytes as csrc/int8_cpu.cpp.
//
// Quantize, one CTA per row (bitsandbytes' kInt8VectorQuant layout; rows of cols % 8 == 0 take the
// 16-byte vector kernel k_quantize_int8_vec, which applies the same formulas element by element):
//   SCB = fp16 value of max|x| over the row, taken on the integer bits of |x| in the SOURCE dtype
//         (fp16 rounding is monotone: max|fp16(x)| = fp16(max|x|)), so no per-element rounding is needed
//   s   = scale_table ? scale_table[fp16 bits of SCB] : __fmul_rn(__frcp_rn(SCB), 127)   (bnb's CPU scale)
//   q   = __float2int_rn(__fmul_rn(fp16(x), s)), a row with SCB 0 or +inf all zeros (bnb's NaN -> 0)
// bitsandbytes' own CUDA kernel computes s = __fdividef(127, SCB); the scale table of
// formats.int8.cuda_scale_table (measured on an H200) reproduces those bytes on every device, so
// --int8-scale cuda gives one result on the CPU and here. Dequantize: w = (q * SCB) * f32(1/127), two
// rounded products, one round-to-nearest-even cast.
#include <algorithm>

#include "common.cuh"

namespace qm {
namespace cuda {

namespace {

constexpr int kRowThreads = 256;
constexpr uint32_t kInv127Bits = 0x3C010204u;

template <typename T> struct Bits;
template <> struct Bits<float> {
  static constexpr uint32_t kInf = 0x7f800000u;
  __device__ static __forceinline__ uint32_t abs(const float* p) { return __float_as_uint(*p) & 0x7fffffffu; }
  __device__ static __forceinline__ float value(uint32_t b) { return __uint_as_float(b); }
};
template <> struct Bits<__half> {
  static constexpr uint32_t kInf = 0x7c00u;
  __device__ static __forceinline__ uint32_t abs(const __half* p) {
    return static_cast<uint32_t>(__half_as_ushort(*p)) & 0x7fffu;
  }
  __device__ static __forceinline__ float value(uint32_t b) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
  }
};
template <> struct Bits<__nv_bfloat16> {
  static constexpr uint32_t kInf = 0x7f80u;
  __device__ static __forceinline__ uint32_t abs(const __nv_bfloat16* p) {
    return static_cast<uint32_t>(__bfloat16_as_ushort(*p)) & 0x7fffu;
  }
  __device__ static __forceinline__ float value(uint32_t b) { return __uint_as_float(b << 16); }
};

__device__ __forceinline__ float round_f16(float v) { return __half2float(__float2half_rn(v)); }

// SCB of a row from each thread's max |x| bits: the block-wide max as an fp16 value (exact for fp16
// input). Thread 0 stores it and raises flag for a NaN / Inf; every thread gets it back.
template <typename T>
__device__ __forceinline__ float row_scb(uint32_t m, int64_t row, float* __restrict__ scb, int* __restrict__ flag) {
  __shared__ uint32_t s_max[kRowThreads / 32];
  m = warp_max_xor(m, 32);
  if ((threadIdx.x & 31) == 0) s_max[threadIdx.x >> 5] = m;
  __syncthreads();
  m = 0;
#pragma unroll
  for (int w = 0; w < kRowThreads / 32; ++w) m = max(m, s_max[w]);
  const float am = round_f16(Bits<T>::value(m));
  if (threadIdx.x == 0) {
    scb[row] = am;
    if (m >= Bits<T>::kInf && flag != nullptr) atomicOr(flag, 1);
  }
  return am;
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
k_quantize_int8(const T* __restrict__ x, int64_t cols, const float* __restrict__ table,
                int8_t* __restrict__ codes, float* __restrict__ scb, int* __restrict__ flag) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * cols;
  uint32_t m = 0;
  for (int64_t j = threadIdx.x; j < cols; j += kRowThreads) m = max(m, Bits<T>::abs(xr + j));
  const float am = row_scb<T>(m, row, scb, flag);
  int8_t* out = codes + row * cols;
  if (!(am > 0.0f) || __float_as_uint(am) >= 0x7f800000u) {  // SCB 0, +inf (or NaN: flagged)
    for (int64_t j = threadIdx.x; j < cols; j += kRowThreads) out[j] = 0;
    return;
  }
  const float s =
      table != nullptr ? table[__half_as_ushort(__float2half_rn(am))] : __fmul_rn(__frcp_rn(am), 127.0f);
  for (int64_t j = threadIdx.x; j < cols; j += kRowThreads) {
    const float h = round_f16(Elem<T>::load(xr + j));
    out[j] = static_cast<int8_t>(__float2int_rn(__fmul_rn(h, s)));
  }
}

// The vector path of k_quantize_int8 (cols % 8 == 0, x 16-byte and codes 8-byte aligned): the same
// per-element formulas on groups of 8 elements, 16-byte loads and 8-byte stores. A thread keeps its
// first kHeld groups in registers between the absmax pass and the code pass (rows up to
// kRowThreads * 8 * kHeld = 8192 columns are read once); later groups are read again (from L1/L2).
constexpr int kHeld = 4;

template <typename T>
struct Raw8 {  // 8 elements' bits: one uint4 (16-bit types) or two (float32)
  uint4 a, b;
};

template <typename T>
__device__ __forceinline__ Raw8<T> load8(const T* __restrict__ p) {
  const uint4* v = reinterpret_cast<const uint4*>(p);
  Raw8<T> r;
  r.a = __ldg(v);
  r.b = sizeof(T) == 4 ? __ldg(v + 1) : make_uint4(0u, 0u, 0u, 0u);
  return r;
}

// max |x| over the 8 elements, as integer bits of the source dtype (Bits<T>::abs of each).
template <typename T>
__device__ __forceinline__ uint32_t max_abs8(const Raw8<T>& r) {
  const uint32_t w[8] = {r.a.x, r.a.y, r.a.z, r.a.w, r.b.x, r.b.y, r.b.z, r.b.w};
  uint32_t m = 0;
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < 8; ++i) m = max(m, w[i] & 0x7fffffffu);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) m = max(m, max(w[i] & 0x7fffu, (w[i] >> 16) & 0x7fffu));
  }
  return m;
}

// The 8 codes of round_half_even(fp16(x) * s), packed little-endian (element j in byte j).
template <typename T>
__device__ __forceinline__ uint2 codes8(const Raw8<T>& r, float s) {
  float v[8];
  widen16(r.a, v, static_cast<const T*>(nullptr));
  if constexpr (sizeof(T) == 4) widen16(r.b, v + 4, static_cast<const T*>(nullptr));
  uint32_t lo = 0, hi = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const uint32_t q = static_cast<uint32_t>(__float2int_rn(__fmul_rn(round_f16(v[j]), s))) & 0xffu;
    if (j < 4) lo |= q << (8 * j);
    else hi |= q << (8 * (j - 4));
  }
  return make_uint2(lo, hi);
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
k_quantize_int8_vec(const T* __restrict__ x, int64_t cols, const float* __restrict__ table,
                    int8_t* __restrict__ codes, float* __restrict__ scb, int* __restrict__ flag) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * cols;
  const int64_t groups = cols >> 3;
  Raw8<T> held[kHeld];
  uint32_t m = 0;
#pragma unroll
  for (int i = 0; i < kHeld; ++i) {
    const int64_t g = threadIdx.x + static_cast<int64_t>(i) * kRowThreads;
    if (g < groups) {
      held[i] = load8(xr + 8 * g);
      m = max(m, max_abs8(held[i]));
    }
  }
  for (int64_t g = threadIdx.x + kHeld * kRowThreads; g < groups; g += kRowThreads) m = max(m, max_abs8(load8(xr + 8 * g)));
  const float am = row_scb<T>(m, row, scb, flag);
  uint2* out = reinterpret_cast<uint2*>(codes + row * cols);
  if (!(am > 0.0f) || __float_as_uint(am) >= 0x7f800000u) {  // SCB 0, +inf (or NaN: flagged)
    for (int64_t g = threadIdx.x; g < groups; g += kRowThreads) out[g] = make_uint2(0u, 0u);
    return;
  }
  const float s =
      table != nullptr ? table[__half_as_ushort(__float2half_rn(am))] : __fmul_rn(__frcp_rn(am), 127.0f);
#pragma unroll
  for (int i = 0; i < kHeld; ++i) {
    const int64_t g = threadIdx.x + static_cast<int64_t>(i) * kRowThreads;
    if (g < groups) out[g] = codes8(held[i], s);
  }
  for (int64_t g = threadIdx.x + kHeld * kRowThreads; g < groups; g += kRowThreads) out[g] = codes8(load8(xr + 8 * g), s);
}

template <typename OutT>
__global__ void __launch_bounds__(kRowThreads)
k_dequantize_int8(const int8_t* __restrict__ codes, const float* __restrict__ scb, int64_t rows, int64_t cols,
                  OutT* __restrict__ out) {
  const float k = __uint_as_float(kInv127Bits);
  const int64_t n = rows * cols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kRowThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kRowThreads) {
    const float w = __fmul_rn(static_cast<float>(codes[i]), scb[i / cols]);
    out[i] = Elem<OutT>::from(__fmul_rn(w, k));
  }
}

template <typename T>
void launch_quantize(bool vec, unsigned grid, cudaStream_t st, const T* x, int64_t cols, const float* tb, int8_t* cp,
                     float* sp, int* fp) {
  if (vec) {
    k_quantize_int8_vec<T><<<grid, kRowThreads, 0, st>>>(x, cols, tb, cp, sp, fp);
  } else {
    k_quantize_int8<T><<<grid, kRowThreads, 0, st>>>(x, cols, tb, cp, sp, fp);
  }
}

}  // namespace

int quantize_int8(int device, uintptr_t x, int dtype, int64_t rows, int64_t cols, uintptr_t table,
                  uintptr_t codes, uintptr_t scb, uintptr_t flag, uintptr_t stream) {
  if (rows < 0 || cols < 0 || rows >= (int64_t{1} << 31)) return kBadSize;
  if (rows == 0 || cols == 0) return kOk;
  if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) return static_cast<int>(e);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const auto* tb = reinterpret_cast<const float*>(table);
  auto* cp = reinterpret_cast<int8_t*>(codes);
  auto* sp = reinterpret_cast<float*>(scb);
  auto* fp = reinterpret_cast<int*>(flag);
  const unsigned grid = static_cast<unsigned>(rows);
  // Vector path: every row starts 16-byte aligned in x and 8-byte aligned in codes.
  const bool vec = cols % 8 == 0 && (x & 15u) == 0 && (codes & 7u) == 0;
  switch (dtype) {
    case kF32:
      launch_quantize<float>(vec, grid, st, reinterpret_cast<const float*>(x), cols, tb, cp, sp, fp);
      break;
    case kF16:
      launch_quantize<__half>(vec, grid, st, reinterpret_cast<const __half*>(x), cols, tb, cp, sp, fp);
      break;
    case kBF16:
      launch_quantize<__nv_bfloat16>(vec, grid, st, reinterpret_cast<const __nv_bfloat16*>(x), cols, tb, cp, sp, fp);
      break;
    default:
      return kBadDtype;
  }
  return static_cast<int>(cudaGetLastError());
}

int dequantize_int8(int device, uintptr_t codes, uintptr_t scb, int64_t rows, int64_t cols, int out_dtype,
                    uintptr_t out, uintptr_t stream) {
  if (rows < 0 || cols < 0) return kBadSize;
  if (rows == 0 || cols == 0) return kOk;
  if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) return static_cast<int>(e);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const auto* cp = reinterpret_cast<const int8_t*>(codes);
  const auto* sp = reinterpret_cast<const float*>(scb);
  const int64_t blocks = std::min<int64_t>((rows * cols + kRowThreads - 1) / kRowThreads, int64_t{1} << 20);
  const unsigned grid = static_cast<unsigned>(blocks);
  switch (out_dtype) {
    case kF32:
      k_dequantize_int8<float><<<grid, kRowThreads, 0, st>>>(cp, sp, rows, cols, reinterpret_cast<float*>(out));
      break;
    case kF16:
      k_dequantize_int8<__half><<<grid, kRowThreads, 0, st>>>(cp, sp, rows, cols, reinterpret_cast<__half*>(out));
      break;
    case kBF16:
      k_dequantize_int8<__nv_bfloat16>
          <<<grid, kRowThreads, 0, st>>>(cp, sp, rows, cols, reinterpret_cast<__nv_bfloat16*>(out));
      break;
    default:
      return kBadDtype;
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace qm
