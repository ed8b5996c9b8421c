// Fused 4-bit GEMV / small-batch GEMM: y[b, o] = sum_k x[b, k] * W[o, k], b < B (1..8).
// W is the [N, K] weight quantized over its flattened elements (blocks may cross rows). Each weight
// is decoded exactly as dequantize_4bit does (quant_map[q] * absmax, absmax decoded inline when
// nested), then multiplied into float32 accumulators (fused multiply-add on purpose: this is not a
// bit-exact path; tests use a tolerance). Packed weights, absmax and x are each read once from memory.
//
// Instantiated configurations:
//   k_gemv_fast<T, B, R, P, MINB>  T in {float, __half, __nv_bfloat16}, B in 1..8, R = 2 or 4 rows per
//                        warp (4 when N >= 8192), P chunks in flight (launch_fast lists the B <= 2
//                        variants); K % 32 == 0, 16-byte aligned x and packed. Each lane
//                        takes 32 weights (16 bytes) of each row a step, with the next step's bytes
//                        and absmax already in flight; sums quant_map[q] * x over the 32 weights, then
//                        scales by their absmax.
//   k_gemv_generic<T>    any K, any alignment: one warp per row, one weight per lane per step.
// fp16/bf16 activations go to the tensor-core kernel of gemv_mma.cu instead (gemv_4bit below), float32
// ones and layouts it does not take stay here.
#include "common.cuh"
#include "gemv_mma.cuh"
#include "gemv_stream.cuh"

namespace qm {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

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

// What one lane prefetches for one 32-weight chunk of each of its rows: the 16 packed bytes and the
// raw absmax inputs (float absmax, or nested code + nested absmax), so that no load sits on the
// critical path of the multiply-adds.
template <int R>
struct ChunkLoad {
  uint4 w[R];
  float a[R];      // absmax, or the nested absmax of the chunk's nested block
  uint32_t c[R];   // nested code (nested only)
};

template <int R>
__device__ __forceinline__ void load_chunk(ChunkLoad<R>& L, const uint8_t* __restrict__ packed,
                                           const float* __restrict__ absmax, const uint8_t* __restrict__ nc,
                                           const float* __restrict__ na, bool nested, int64_t row0, int nrows,
                                           int64_t K, int64_t c, int log2bs) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r < nrows) {
      const int64_t e = (row0 + r) * K + c * 32;  // first weight of the chunk (flat index)
      L.w[r] = __ldcs(reinterpret_cast<const uint4*>(packed + (e >> 1)));
      const int64_t blk = e >> log2bs;
      if (nested) {
        L.c[r] = __ldg(nc + blk);
        L.a[r] = __ldg(na + (blk >> 8));
      } else {
        L.c[r] = 0;
        L.a[r] = __ldg(absmax + blk);
      }
    } else {
      L.w[r] = make_uint4(0, 0, 0, 0);
      L.a[r] = 0.0f;
      L.c[r] = 0;
    }
  }
}

template <typename T, int B, int R, int P, int MINB>
__global__ void __launch_bounds__(kThreads, MINB)
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
  __shared__ float s_map8[256];
  if (threadIdx.x < 16) s_qm[threadIdx.x] = quant_map[threadIdx.x];
  if (nested) s_map8[threadIdx.x] = map8[threadIdx.x];  // kThreads == 256
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5)) * R;
  if (row0 >= N) return;
  const int nrows = static_cast<int>(N - row0 < R ? N - row0 : R);  // rows of this warp that exist
  const int64_t chunks = K >> 5;  // 32 weights = 16 bytes per chunk

  float acc[R][B];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int b = 0; b < B; ++b) acc[r][b] = 0.0f;

  // P chunks in flight per row ahead of the one being multiplied (P = 1 or 2).
  ChunkLoad<R> next, next2;
  int64_t c = lane;
  if (c < chunks) load_chunk(next, packed, absmax, ncodes, nabs, nested, row0, nrows, K, c, log2bs);
  if (P > 1 && c + 32 < chunks) load_chunk(next2, packed, absmax, ncodes, nabs, nested, row0, nrows, K, c + 32, log2bs);
  for (; c < chunks; c += 32) {
    const ChunkLoad<R> cur = next;
    if constexpr (P > 1) {
      next = next2;
      if (c + 64 < chunks) load_chunk(next2, packed, absmax, ncodes, nabs, nested, row0, nrows, K, c + 64, log2bs);
    } else {
      if (c + 32 < chunks) load_chunk(next, packed, absmax, ncodes, nabs, nested, row0, nrows, K, c + 32, log2bs);
    }
    // Sum quant_map[q] * x over the chunk's 32 weights, then scale by the chunk's absmax (a chunk
    // never straddles a block: blocksize >= 32 and chunks start at multiples of 32).
    float part[R][B];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int b = 0; b < B; ++b) part[r][b] = 0.0f;
#pragma unroll
    for (int q = 0; q < 4; ++q) {  // 4 words of 8 codes each
#pragma unroll
      for (int b = 0; b < B; ++b) {
        float xv[8];
        load_x8(x, b * K + c * 32 + q * 8, xv);  // converted once, used by all R rows
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const uint32_t word = q == 0 ? cur.w[r].x : q == 1 ? cur.w[r].y : q == 2 ? cur.w[r].z : cur.w[r].w;
#pragma unroll
          for (int j = 0; j < 4; ++j) {  // byte j holds elements 2j (high nibble) and 2j+1 (low)
            part[r][b] = __fmaf_rn(s_qm[(word >> (8 * j + 4)) & 15u], xv[2 * j], part[r][b]);
            part[r][b] = __fmaf_rn(s_qm[(word >> (8 * j)) & 15u], xv[2 * j + 1], part[r][b]);
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float am = nested ? __fadd_rn(__fmul_rn(s_map8[cur.c[r]], cur.a[r]), offset) : cur.a[r];
#pragma unroll
      for (int b = 0; b < B; ++b) acc[r][b] = __fmaf_rn(am, part[r][b], acc[r][b]);
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int b = 0; b < B; ++b) acc[r][b] = warp_sum(acc[r][b]);
  if (lane == 0) {
#pragma unroll
    for (int b = 0; b < B; ++b) {
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (r < nrows) y[b * N + row0 + r] = Elem<T>::from(acc[r][b]);
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

// Rows per warp R: each x load and conversion is shared by R rows, which cuts on-chip traffic and
// instructions per weight. P: chunks in flight per row. MINB: CTAs per SM the register budget must allow.
template <typename T, int B, int R, int P, int MINB>
cudaError_t launch_fast_cfg(const GemvArgs& a) {
  const int64_t rows_per_cta = kWarps * R;
  const int64_t ctas = (a.N + rows_per_cta - 1) / rows_per_cta;
  k_gemv_fast<T, B, R, P, MINB><<<static_cast<unsigned>(ctas), kThreads, 0, a.st>>>(
      static_cast<const T*>(a.x), a.packed, a.absmax, a.nc, a.na, a.offset, a.map8, a.qm, a.nc != nullptr,
      static_cast<T*>(a.y), a.N, a.K, a.log2bs);
  return cudaGetLastError();
}

// Configurations of the batch-1/2 kernel (variant argument; 0 = the default choice, measured best
// by bench/bench_cuda.py): 1 R2P1, 2 R4P1, 3 R4P1 with 4 CTAs/SM, 4 R4P2, 5 R2P2.
template <typename T, int B>
cudaError_t launch_fast(const GemvArgs& a, int variant) {
  if constexpr (B <= 2) {
    switch (variant) {
      case 1: return launch_fast_cfg<T, B, 2, 1, 0>(a);
      case 2: return launch_fast_cfg<T, B, 4, 1, 0>(a);
      case 3: return launch_fast_cfg<T, B, 4, 1, 4>(a);
      case 4: return launch_fast_cfg<T, B, 4, 2, 0>(a);
      case 5: return launch_fast_cfg<T, B, 2, 2, 0>(a);
      default: break;
    }
  }
  return a.N >= 8192 ? launch_fast_cfg<T, B, 4, 1, 0>(a) : launch_fast_cfg<T, B, 2, 1, 0>(a);
}

template <typename T>
cudaError_t launch(const GemvArgs& a, int batch, bool fast, int variant) {
  if (!fast) {
    const int64_t ctas = (a.N + kWarps - 1) / kWarps;
    k_gemv_generic<T><<<static_cast<unsigned>(ctas), kThreads, 0, a.st>>>(
        static_cast<const T*>(a.x), a.packed, a.absmax, a.nc, a.na, a.offset, a.map8, a.qm, a.nc != nullptr,
        static_cast<T*>(a.y), batch, a.N, a.K, a.log2bs);
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

int gemv_4bit(int device, uintptr_t x, int dtype, int batch, int64_t N, int64_t K, int blocksize, uintptr_t packed,
              uintptr_t absmax, uintptr_t ncodes, uintptr_t nested_absmax, float offset, uintptr_t map8,
              uintptr_t quant_map, uintptr_t y, uintptr_t stream, int variant, uintptr_t scratch) {
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
  // fp16/bf16 activations take the tensor-core kernel (gemv_mma.cu) whenever its layout conditions
  // hold: on an H100 it is 4-10% faster than the CUDA-core kernel below at batch 1 (69 vs 74 us on
  // 32768 x 8192) and 2.4-3.2x faster at batch 8, where its cost hardly grows. Variants 6..9 force it
  // with 1, 2, 4 or 8 warps per row tile, 1..5 force a configuration of the CUDA-core kernel, 10 the
  // CUDA-core kernel's default configuration. 11..18 the lean tensor-core kernel of gemv_stream.cu
  // (taken by default where gemv_stream_preferred says so), 20 the gemv_mma.cu kernel, auto split.
  const GemvMmaArgs m{a.x, a.packed, a.absmax, a.nc, a.na, offset, a.map8, a.qm, a.y, batch, N, K, a.log2bs, a.st};
  if (variant == 0 && gemv_stream_preferred(N, K, batch)) variant = kStreamAuto;
  if (is_stream_variant(variant) && gemv_stream_supported(device, dtype, K, blocksize, x, packed, absmax, ncodes))
    return static_cast<int>(launch_gemv_stream(m, dtype, device, variant, reinterpret_cast<float*>(scratch)));
  if (is_stream_variant(variant) || variant == kMmaAuto) variant = 0;  // the default kernel choice below
  const bool mma = variant == 0 || (variant >= 6 && variant <= 9);
  if (mma && gemv_mma_supported(device, dtype, K, blocksize, x, packed, absmax, ncodes))
    return static_cast<int>(launch_gemv_mma(m, dtype, variant >= 6 ? 1 << (variant - 6) : 0));
  const bool fast = K % 32 == 0 && aligned16(x) && aligned16(packed);
  switch (dtype) {
    case kF32: return static_cast<int>(launch<float>(a, batch, fast, variant));
    case kF16: return static_cast<int>(launch<__half>(a, batch, fast, variant));
    case kBF16: return static_cast<int>(launch<__nv_bfloat16>(a, batch, fast, variant));
    default: return kBadDtype;
  }
}

int64_t gemv_4bit_scratch(int device, int dtype, int batch, int64_t N, int64_t K, int blocksize, int variant) {
  if (variant == 0 && gemv_stream_preferred(N, K, batch)) variant = kStreamAuto;
  if ((dtype != kF16 && dtype != kBF16) || !is_stream_variant(variant) || !valid_blocksize(blocksize) ||
      batch < 1 || batch > 8)
    return 0;
  return gemv_stream_scratch(device, batch, N, K, variant);
}

int gemv_4bit_multi(int device, uintptr_t x, int dtype, int batch, int64_t K, int blocksize, int count,
                    const int64_t* N, const uintptr_t* packed, const uintptr_t* absmax, const uintptr_t* ncodes,
                    const uintptr_t* nested_absmax, const float* offset, const uintptr_t* map8,
                    const uintptr_t* quant_map, const uintptr_t* y, uintptr_t stream, int variant,
                    uintptr_t scratch) {
  if (count < 1 || count > kGemvMaxWeights) return kBadSize;
  if (!valid_blocksize(blocksize)) return kBadBlocksize;
  if (batch < 1 || batch > 8) return kBadBatch;
  int64_t rows = 0;
  bool stream_ok = dtype == kF16 || dtype == kBF16;
  for (int i = 0; i < count; ++i) {
    if (N[i] < 0 || K < 0 || (N[i] > 0 && K > (int64_t{1} << 40) / N[i]) || N[i] / kWarps >= (int64_t{1} << 31))
      return kBadSize;
    rows += N[i];
    stream_ok = stream_ok && gemv_stream_supported(device, dtype, K, blocksize, x, packed[i], absmax[i], ncodes[i]);
  }
  if (rows / kWarps >= (int64_t{1} << 31)) return kBadSize;
  if (rows == 0) return kOk;
  if (variant == 0 && gemv_stream_preferred(rows, K, batch)) variant = kStreamAuto;
  if (!(stream_ok && is_stream_variant(variant))) {
    // Layouts the stream kernel does not take (float32 x, K % 256 != 0, unaligned), or another kernel
    // forced: one launch per weight, each choosing its kernel as gemv_4bit does.
    for (int i = 0; i < count; ++i) {
      if (const int s = gemv_4bit(device, x, dtype, batch, N[i], K, blocksize, packed[i], absmax[i], ncodes[i],
                                  nested_absmax[i], offset[i], map8[i], quant_map[i], y[i], stream, variant, 0);
          s != kOk)
        return s;
    }
    return kOk;
  }
  if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) return static_cast<int>(e);
  GemvMmaArgs a[kGemvMaxWeights];
  int n = 0;
  for (int i = 0; i < count; ++i) {
    if (N[i] == 0) continue;  // nothing to compute or write
    a[n++] = GemvMmaArgs{reinterpret_cast<const void*>(x),
                         reinterpret_cast<const uint8_t*>(packed[i]),
                         reinterpret_cast<const float*>(absmax[i]),
                         reinterpret_cast<const uint8_t*>(ncodes[i]),
                         reinterpret_cast<const float*>(nested_absmax[i]),
                         offset[i],
                         reinterpret_cast<const float*>(map8[i]),
                         reinterpret_cast<const float*>(quant_map[i]),
                         reinterpret_cast<void*>(y[i]),
                         batch,
                         N[i],
                         K,
                         ilog2(blocksize),
                         reinterpret_cast<cudaStream_t>(stream)};
  }
  return static_cast<int>(launch_gemv_stream_multi(a, n, dtype, device, variant, reinterpret_cast<float*>(scratch)));
}

int64_t gemv_4bit_multi_scratch(int device, int dtype, int batch, int64_t rows, int64_t K, int blocksize,
                                int variant) {
  return gemv_4bit_scratch(device, dtype, batch, rows, K, blocksize, variant);
}

}  // namespace cuda
}  // namespace qm
