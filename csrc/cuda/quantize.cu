// CUDA 4-bit blockwise quantize (NF4/FP4) and nested absmax quantization.
//
// Same bits as the CPU kernels and formats/reference.py (design.md, exactness rules):
//   absmax = max|x| over the block (unclamped), inv = 1 / max(absmax, 1e-38) (IEEE reciprocal),
//   s = x * inv (IEEE multiply), code = NF4 threshold count / FP4 tree, first element in the high nibble.
// Nested: offset = float32(S / nb), S the float64 sum, sequential within chunks of 1024 and then over
// the chunk sums; nested code = number of dynamic-8 midpoints strictly below (a - offset) * inv.
//
// Instantiated configurations (one table):
//   k_quantize_4bit<T, QT>   T in {float, __half, __nv_bfloat16} x QT in {NF4, FP4}; blocksize is a
//                            run-time power of two 32..4096 (16 elements per thread, 256 threads).
//   k_chunk_sums, k_offset, k_nested_quantize, k_nested_dequantize: float32 absmax only.
#include <algorithm>

#include "common.cuh"

namespace qm {
namespace cuda {

namespace {

// The device literals must equal csrc/codebooks.h (the C++ copy of formats/codebooks.py).
constexpr float kHostNF4T[15] = {QM_NF4_THRESHOLDS};
constexpr float kHostFP4T[7] = {QM_FP4_THRESHOLDS};
constexpr bool same_tables() {
  for (int i = 0; i < 15; ++i)
    if (kHostNF4T[i] != ::qm::kNF4Thresholds[i]) return false;
  for (int i = 0; i < 7; ++i)
    if (kHostFP4T[i] != ::qm::kFP4Thresholds[i]) return false;
  for (int k = 0; k < 8; ++k)
    if (static_cast<int32_t>((kFP4TreeNibbles >> (4 * k)) & 7u) != ::qm::kFP4TreeCodes[k]) return false;
  return true;
}
static_assert(same_tables(), "CUDA threshold literals differ from csrc/codebooks.h");

constexpr int kThreads = 256;  // threads per CTA in the element-wise kernels
constexpr int kEPT = 16;       // elements per thread: 8 packed bytes, one 8-byte store

// One thread quantizes 16 consecutive elements; the G = blocksize/16 threads of a quant block
// (G = 2..256, aligned in the CTA) share its absmax through shuffles, and through shared memory
// when the block spans several warps (blocksize >= 1024).
template <typename T, int QT>
__global__ void __launch_bounds__(kThreads)
k_quantize_4bit(const T* __restrict__ x,         // [n] input, flattened
                int64_t n,                       // element count
                int log2bs,                      // log2(blocksize), 5..12
                bool aligned,                    // x 16-byte aligned (vector loads)
                uint8_t* __restrict__ packed,    // [(n+1)/2] out: two codes per byte, first high
                float* __restrict__ absmax,      // [ceil(n/bs)] out: max|x| per block
                int* __restrict__ flag) {        // [1] out: set non-zero on NaN/Inf (may be null)
  __shared__ uint32_t s_warp_max[kThreads / 32];
  __shared__ EncodeTables s_tables;
  build_tables<QT>(&s_tables, threadIdx.x);
  __syncthreads();
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t e0 = t * kEPT;

  float v[kEPT];
  load_run<T, kEPT>(x, e0, n, aligned, v);

  uint32_t m = 0;
#pragma unroll
  for (int i = 0; i < kEPT; ++i) m = max(m, abs_bits(v[i]));

  const int group = 1 << (log2bs - 4);  // threads per quant block
  if (group <= 32) {
    m = warp_max_xor(m, group);
  } else {
    m = warp_max_xor(m, 32);
    const int warp = threadIdx.x >> 5, wpg = group >> 5;
    if ((threadIdx.x & 31) == 0) s_warp_max[warp] = m;
    __syncthreads();
    const int first = (warp / wpg) * wpg;
    m = 0;
    for (int w = 0; w < wpg; ++w) m = max(m, s_warp_max[first + w]);
  }
  if (e0 >= n) return;

  const float am = __uint_as_float(m);
  const bool leader = (threadIdx.x & (group - 1)) == 0;
  if (leader) {
    absmax[e0 >> log2bs] = am;
    if (m >= kInfBits && flag != nullptr) atomicOr(flag, 1);
  }
  const float inv = __frcp_rn(fmaxf(am, kTiny));

  uint32_t word[2] = {0u, 0u};
#pragma unroll
  for (int j = 0; j < kEPT / 2; ++j) {
    const uint32_t hi = encode<QT>(__fmul_rn(v[2 * j], inv), &s_tables);
    const uint32_t lo = encode<QT>(__fmul_rn(v[2 * j + 1], inv), &s_tables);
    word[j >> 2] |= ((hi << 4) | lo) << (8 * (j & 3));
  }
  const int64_t b0 = e0 >> 1;
  const int64_t nbytes = (n + 1) >> 1;
  if (b0 + 8 <= nbytes) {
    *reinterpret_cast<uint2*>(packed + b0) = make_uint2(word[0], word[1]);
  } else {
    for (int j = 0; j < 8 && b0 + j < nbytes; ++j) packed[b0 + j] = (word[j >> 2] >> (8 * (j & 3))) & 0xffu;
  }
}

// Exponent range of non-negative float32 values, for the exact-sum shortcut below: biased exponent of
// the largest value and of the smallest non-zero one (subnormals count as exponent 1: same ulp).
struct ExpRange {
  int lo, hi;  // lo = 255, hi = 0 when every value is zero
};

__device__ __forceinline__ ExpRange exp_range(float v) {
  const uint32_t b = __float_as_uint(v);
  if (b == 0u) return ExpRange{255, 0};
  const int e = max(static_cast<int>(b >> 23), 1);
  return ExpRange{e, e};
}

__device__ __forceinline__ ExpRange merge(ExpRange a, ExpRange b) { return ExpRange{min(a.lo, b.lo), max(a.hi, b.hi)}; }

// The float64 sum of `count` non-negative float32 values whose exponents span r is EXACT in every order
// when ceil(log2(count)) + (r.hi - r.lo) <= 29: all values are multiples of the smallest one's ulp
// 2^(lo-150), every partial sum is below count * 2^(hi-126), and 53 bits cover that range. Then a
// parallel tree sum has the same bits as the sequential sum the exactness rules define; otherwise the
// kernels below fall back to the sequential order itself.
__device__ __forceinline__ bool sum_is_exact(ExpRange r, int64_t count) {
  if (r.hi == 0) return true;  // all zero
  const int log2count = count <= 1 ? 0 : 64 - __clzll(static_cast<unsigned long long>(count - 1));
  return log2count + (r.hi - r.lo) <= 29;
}

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) v = __dadd_rn(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

__device__ __forceinline__ ExpRange warp_range(ExpRange r) {
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) {
    r.lo = min(r.lo, __shfl_xor_sync(0xffffffffu, r.lo, off));
    r.hi = max(r.hi, __shfl_xor_sync(0xffffffffu, r.hi, off));
  }
  return r;
}

// Float64 sum of each chunk of 1024 absmax values, one warp per chunk; also records each chunk's
// exponent range (second half of the scratch) for k_offset. Sequential left-to-right (the defined
// order) unless the sum is exact, in which case a tree sum gives the same bits.
constexpr int kChunkWarps = 4;
__global__ void __launch_bounds__(kChunkWarps * 32)
k_chunk_sums(const float* __restrict__ absmax,  // [nb]
             int64_t nb,
             double* __restrict__ sums,         // [2 * nchunks] out: sums, then exponent ranges
             int64_t nchunks) {
  __shared__ float s_chunk[kChunkWarps][kOffsetChunk];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kChunkWarps + warp;
  const int64_t begin = c * kOffsetChunk;
  if (begin >= nb) return;
  const int len = static_cast<int>(nb - begin < kOffsetChunk ? nb - begin : kOffsetChunk);
  float* chunk = s_chunk[warp];
  double part = 0.0;
  ExpRange r{255, 0};
  for (int i = lane; i < len; i += 32) {
    const float v = __ldg(absmax + begin + i);
    chunk[i] = v;
    part = __dadd_rn(part, static_cast<double>(v));
    r = merge(r, exp_range(v));
  }
  part = warp_sum_f64(part);
  r = warp_range(r);
  __syncwarp();
  if (lane != 0) return;
  double acc = part;
  if (!sum_is_exact(r, len)) {
    acc = 0.0;  // 0 + a0 == a0 exactly, so this is the plain left-to-right sum
    for (int i = 0; i < len; ++i) acc = __dadd_rn(acc, static_cast<double>(chunk[i]));
  }
  sums[c] = acc;
  sums[nchunks + c] = __longlong_as_double(static_cast<long long>(r.lo) | (static_cast<long long>(r.hi) << 32));
}

// offset = float32(S / nb), S the float64 sum of the chunk sums: a tree sum when exact over all nb
// values (same bits), else thread 0 adds them in order.
constexpr int kOffsetThreads = 1024;
__global__ void __launch_bounds__(kOffsetThreads)
k_offset(const double* __restrict__ sums,  // [2 * nchunks]: sums, then exponent ranges
         int64_t nchunks, int64_t nb,
         float* __restrict__ offset) {      // [1] out
  __shared__ double s_part[kOffsetThreads / 32];
  __shared__ int s_lo[kOffsetThreads / 32], s_hi[kOffsetThreads / 32];
  double part = 0.0;
  ExpRange r{255, 0};
  for (int64_t i = threadIdx.x; i < nchunks; i += kOffsetThreads) {
    part = __dadd_rn(part, __ldg(sums + i));
    const long long er = __double_as_longlong(__ldg(sums + nchunks + i));
    r = merge(r, ExpRange{static_cast<int>(er & 0xffffffffLL), static_cast<int>(er >> 32)});
  }
  part = warp_sum_f64(part);
  r = warp_range(r);
  const int warp = threadIdx.x >> 5;
  if ((threadIdx.x & 31) == 0) {
    s_part[warp] = part;
    s_lo[warp] = r.lo;
    s_hi[warp] = r.hi;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  double acc = 0.0;
  for (int w = 0; w < kOffsetThreads / 32; ++w) {
    acc = __dadd_rn(acc, s_part[w]);
    r = merge(r, ExpRange{s_lo[w], s_hi[w]});
  }
  if (!sum_is_exact(r, nb)) {
    acc = 0.0;
#pragma unroll 8
    for (int64_t c = 0; c < nchunks; ++c) acc = __dadd_rn(acc, __ldg(sums + c));
  }
  *offset = nb > 0 ? __double2float_rn(__ddiv_rn(acc, static_cast<double>(nb))) : 0.0f;
}

// One CTA of 256 threads per nested block: centre on the offset, max|.|, scale, count midpoints below.
__global__ void __launch_bounds__(kNestedBlock)
k_nested_quantize(const float* __restrict__ absmax,   // [nb]
                  int64_t nb,
                  const float* __restrict__ offset,   // [1]
                  const float* __restrict__ mids,     // [255] dynamic-8 midpoints, ascending
                  uint8_t* __restrict__ codes,        // [nb] out
                  float* __restrict__ nested_absmax) {// [ceil(nb/256)] out
  __shared__ float s_mid[256];
  __shared__ uint32_t s_max[kNestedBlock / 32];
  const int tid = threadIdx.x;
  s_mid[tid] = tid < 255 ? mids[tid] : __uint_as_float(kInfBits);  // +inf sentinel
  const float off = __ldg(offset);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kNestedBlock + tid;
  const float c = i < nb ? __fsub_rn(__ldg(absmax + i), off) : 0.0f;
  uint32_t m = warp_max_xor(abs_bits(c), 32);
  if ((tid & 31) == 0) s_max[tid >> 5] = m;
  __syncthreads();
  m = 0;
#pragma unroll
  for (int w = 0; w < kNestedBlock / 32; ++w) m = max(m, s_max[w]);
  const float na = __uint_as_float(m);
  if (tid == 0) nested_absmax[blockIdx.x] = na;
  const float v = __fmul_rn(c, __frcp_rn(fmaxf(na, kTiny)));
  // Number of midpoints strictly below v: branch-free lower bound over 256 slots (+inf last).
  int lo = 0;
#pragma unroll
  for (int step = 128; step >= 1; step >>= 1) lo += (s_mid[lo + step - 1] < v) ? step : 0;
  if (i < nb) codes[i] = static_cast<uint8_t>(lo);
}

__global__ void k_nested_dequantize(const uint8_t* __restrict__ codes,   // [nb]
                                    int64_t nb,
                                    const float* __restrict__ nabs,      // [ceil(nb/256)]
                                    float offset,
                                    const float* __restrict__ map8,      // [256]
                                    float* __restrict__ out) {           // [nb] out
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < nb) out[i] = decode_nested(codes, nabs, offset, map8, i);
}

template <typename T, int QT>
cudaError_t launch_quantize(const void* x, int64_t n, int log2bs, uint8_t* packed, float* absmax, int* flag,
                            cudaStream_t stream) {
  const int64_t threads = (n + kEPT - 1) / kEPT;
  const int64_t ctas = (threads + kThreads - 1) / kThreads;
  const bool aligned = aligned16(reinterpret_cast<uintptr_t>(x));
  k_quantize_4bit<T, QT><<<static_cast<unsigned>(ctas), kThreads, 0, stream>>>(
      static_cast<const T*>(x), n, log2bs, aligned, packed, absmax, flag);
  return cudaGetLastError();
}

}  // namespace

int quantize_4bit(int device, uintptr_t x, int dtype, int64_t n, int blocksize, int quant_type,
                  uintptr_t packed, uintptr_t absmax, uintptr_t flag, uintptr_t stream) {
  if (!valid_blocksize(blocksize)) return kBadBlocksize;
  if (quant_type != kNF4 && quant_type != kFP4) return kBadQuantType;
  if (n < 0 || n / kEPT / kThreads >= (int64_t{1} << 31)) return kBadSize;
  if (n == 0) return kOk;
  if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) return static_cast<int>(e);
  const void* xp = reinterpret_cast<const void*>(x);
  auto* pk = reinterpret_cast<uint8_t*>(packed);
  auto* am = reinterpret_cast<float*>(absmax);
  auto* fl = reinterpret_cast<int*>(flag);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const int l = ilog2(blocksize);
  cudaError_t e;
  const bool nf4 = quant_type == kNF4;
  switch (dtype) {
    case kF32: e = nf4 ? launch_quantize<float, kNF4>(xp, n, l, pk, am, fl, st)
                       : launch_quantize<float, kFP4>(xp, n, l, pk, am, fl, st); break;
    case kF16: e = nf4 ? launch_quantize<__half, kNF4>(xp, n, l, pk, am, fl, st)
                       : launch_quantize<__half, kFP4>(xp, n, l, pk, am, fl, st); break;
    case kBF16: e = nf4 ? launch_quantize<__nv_bfloat16, kNF4>(xp, n, l, pk, am, fl, st)
                        : launch_quantize<__nv_bfloat16, kFP4>(xp, n, l, pk, am, fl, st); break;
    default: return kBadDtype;
  }
  return static_cast<int>(e);
}

int quantize_nested(int device, uintptr_t absmax, int64_t nb, uintptr_t mids, uintptr_t chunk_sums,
                    uintptr_t offset_out, uintptr_t codes, uintptr_t nested_absmax, uintptr_t stream) {
  if (nb < 0 || nb / kNestedBlock >= (int64_t{1} << 31)) return kBadSize;
  if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) return static_cast<int>(e);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const auto* am = reinterpret_cast<const float*>(absmax);
  auto* sums = reinterpret_cast<double*>(chunk_sums);
  auto* off = reinterpret_cast<float*>(offset_out);
  const int64_t nchunks = (nb + kOffsetChunk - 1) / kOffsetChunk;
  if (nchunks > 0) {
    k_chunk_sums<<<static_cast<unsigned>((nchunks + kChunkWarps - 1) / kChunkWarps), kChunkWarps * 32, 0, st>>>(
        am, nb, sums, nchunks);
  }
  k_offset<<<1, kOffsetThreads, 0, st>>>(sums, nchunks, nb, off);
  if (nb > 0) {
    k_nested_quantize<<<static_cast<unsigned>((nb + kNestedBlock - 1) / kNestedBlock), kNestedBlock, 0, st>>>(
        am, nb, off, reinterpret_cast<const float*>(mids), reinterpret_cast<uint8_t*>(codes),
        reinterpret_cast<float*>(nested_absmax));
  }
  return static_cast<int>(cudaGetLastError());
}

int dequantize_nested(int device, uintptr_t codes, int64_t nb, uintptr_t nested_absmax, float offset,
                      uintptr_t map8, uintptr_t absmax_out, uintptr_t stream) {
  if (nb < 0 || nb / kThreads >= (int64_t{1} << 31)) return kBadSize;
  if (nb == 0) return kOk;
  if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) return static_cast<int>(e);
  k_nested_dequantize<<<static_cast<unsigned>((nb + kThreads - 1) / kThreads), kThreads, 0,
                        reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const uint8_t*>(codes), nb, reinterpret_cast<const float*>(nested_absmax), offset,
      reinterpret_cast<const float*>(map8), reinterpret_cast<float*>(absmax_out));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace qm
