// CUDA 4-bit dequantize: out[k] = cast(quant_map[q[k]] * absmax[k / blocksize]), the product in
// float32 and a round-to-nearest-even cast; the absmax is decoded inline when nested
// (map8[c] * nested_absmax + offset, a separate multiply and add). Same bits as the CPU kernels.
//
// Instantiated configurations: k_dequantize_4bit<OutT, NESTED>, OutT in {float, __half,
// __nv_bfloat16} x NESTED in {false, true}; blocksize a run-time power of two 32..4096.
#include "common.cuh"

namespace qm {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kEPT = 16;  // elements per thread: 8 packed bytes in, 16 outputs

// Store 16 float32 values as OutT: vector stores when the run is whole and aligned.
__device__ __forceinline__ void store_run(float* __restrict__ out, int64_t e0, int64_t n, bool vec,
                                          const float* w) {
  if (vec && e0 + kEPT <= n) {
    uint4* p = reinterpret_cast<uint4*>(out + e0);
#pragma unroll
    for (int i = 0; i < 4; ++i)
      p[i] = make_uint4(__float_as_uint(w[4 * i]), __float_as_uint(w[4 * i + 1]), __float_as_uint(w[4 * i + 2]),
                        __float_as_uint(w[4 * i + 3]));
  } else {
    for (int i = 0; i < kEPT && e0 + i < n; ++i) out[e0 + i] = w[i];
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  const T lo = Elem<T>::from(a), hi = Elem<T>::from(b);
  return static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&lo)) |
         (static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&hi)) << 16);
}

template <typename T>
__device__ __forceinline__ void store_run(T* __restrict__ out, int64_t e0, int64_t n, bool vec, const float* w) {
  if (vec && e0 + kEPT <= n) {
    uint4* p = reinterpret_cast<uint4*>(out + e0);
#pragma unroll
    for (int i = 0; i < 2; ++i)
      p[i] = make_uint4(pack2<T>(w[8 * i], w[8 * i + 1]), pack2<T>(w[8 * i + 2], w[8 * i + 3]),
                        pack2<T>(w[8 * i + 4], w[8 * i + 5]), pack2<T>(w[8 * i + 6], w[8 * i + 7]));
  } else {
    for (int i = 0; i < kEPT && e0 + i < n; ++i) out[e0 + i] = Elem<T>::from(w[i]);
  }
}

template <typename OutT, bool NESTED>
__global__ void __launch_bounds__(kThreads)
k_dequantize_4bit(const uint8_t* __restrict__ packed,   // [(n+1)/2] codes, first element high nibble
                  int64_t n,                            // element count
                  int log2bs,                           // log2(blocksize)
                  const float* __restrict__ absmax,     // [nb] float32 (non-nested)
                  const uint8_t* __restrict__ ncodes,   // [nb] nested codes (nested)
                  const float* __restrict__ nabs,       // [ceil(nb/256)] nested absmax (nested)
                  float offset,                         // nested offset
                  const float* __restrict__ map8,       // [256] nested map (nested)
                  const float* __restrict__ quant_map,  // [16] 4-bit code values
                  bool vec,                             // packed 8-byte and out 16-byte aligned
                  OutT* __restrict__ out) {             // [n] out
  __shared__ float s_qm[16];
  if (threadIdx.x < 16) s_qm[threadIdx.x] = quant_map[threadIdx.x];
  __syncthreads();
  const int64_t e0 = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kEPT;
  if (e0 >= n) return;
  const int64_t blk = e0 >> log2bs;  // 16 elements never straddle a block (blocksize >= 32)
  const float am = NESTED ? decode_nested(ncodes, nabs, offset, map8, blk) : __ldg(absmax + blk);

  const int64_t b0 = e0 >> 1;
  const int64_t nbytes = (n + 1) >> 1;
  uint32_t word[2];
  if (vec && b0 + 8 <= nbytes) {
    const uint2 q = __ldcs(reinterpret_cast<const uint2*>(packed + b0));
    word[0] = q.x;
    word[1] = q.y;
  } else {
    word[0] = word[1] = 0;
    for (int j = 0; j < 8 && b0 + j < nbytes; ++j) word[j >> 2] |= static_cast<uint32_t>(packed[b0 + j]) << (8 * (j & 3));
  }
  float w[kEPT];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const uint32_t byte = (word[j >> 2] >> (8 * (j & 3))) & 0xffu;
    w[2 * j] = __fmul_rn(s_qm[byte >> 4], am);
    w[2 * j + 1] = __fmul_rn(s_qm[byte & 15u], am);
  }
  store_run(out, e0, n, vec, w);
}

template <typename OutT>
cudaError_t launch(const uint8_t* packed, int64_t n, int l, const float* am, const uint8_t* nc, const float* na,
                   float off, const float* map8, const float* qm, bool vec, void* out, cudaStream_t st) {
  const int64_t ctas = ((n + kEPT - 1) / kEPT + kThreads - 1) / kThreads;
  if (nc != nullptr)
    k_dequantize_4bit<OutT, true><<<static_cast<unsigned>(ctas), kThreads, 0, st>>>(
        packed, n, l, am, nc, na, off, map8, qm, vec, static_cast<OutT*>(out));
  else
    k_dequantize_4bit<OutT, false><<<static_cast<unsigned>(ctas), kThreads, 0, st>>>(
        packed, n, l, am, nc, na, off, map8, qm, vec, static_cast<OutT*>(out));
  return cudaGetLastError();
}

}  // namespace

int dequantize_4bit(int device, uintptr_t packed, int64_t n, int blocksize, uintptr_t absmax, uintptr_t ncodes,
                    uintptr_t nested_absmax, float offset, uintptr_t map8, uintptr_t quant_map, int out_dtype,
                    uintptr_t out, uintptr_t stream) {
  if (!valid_blocksize(blocksize)) return kBadBlocksize;
  if (n < 0 || n / kEPT / kThreads >= (int64_t{1} << 31)) return kBadSize;
  if (n == 0) return kOk;
  if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) return static_cast<int>(e);
  const auto* pk = reinterpret_cast<const uint8_t*>(packed);
  const auto* am = reinterpret_cast<const float*>(absmax);
  const auto* nc = reinterpret_cast<const uint8_t*>(ncodes);
  const auto* na = reinterpret_cast<const float*>(nested_absmax);
  const auto* m8 = reinterpret_cast<const float*>(map8);
  const auto* qm = reinterpret_cast<const float*>(quant_map);
  const bool vec = (packed & 7u) == 0 && aligned16(out);
  const int l = ilog2(blocksize);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  void* o = reinterpret_cast<void*>(out);
  switch (out_dtype) {
    case kF32: return static_cast<int>(launch<float>(pk, n, l, am, nc, na, offset, m8, qm, vec, o, st));
    case kF16: return static_cast<int>(launch<__half>(pk, n, l, am, nc, na, offset, m8, qm, vec, o, st));
    case kBF16: return static_cast<int>(launch<__nv_bfloat16>(pk, n, l, am, nc, na, offset, m8, qm, vec, o, st));
    default: return kBadDtype;
  }
}

}  // namespace cuda
}  // namespace qm
