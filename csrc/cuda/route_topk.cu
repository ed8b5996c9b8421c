// MoE router after its linear layer, in one launch (moe_cuda.h: route_topk): softmax in float32, top-k,
// optional renormalisation, cast. Bit for bit what transformers' router gets from torch's own CUDA ops
// (converter/loader/router.py checks that at run time and falls back to those ops if not):
//
// - softmax: ATen's persistent warp softmax (PersistentSoftmax.cuh, softmax_warp_forward, dim <= 1024):
//   P = next power of two >= E, a "warp" of WS = min(P, 32) lanes, lane l holding elements l + it * WS;
//   max by `m > e ? m : e` over its elements then a xor butterfly of width WS (Max: `a < b ? b : a`);
//   e = expf(e - m) summed in element order from 0.0f, xor butterfly sum, p = e / s (NaN if s == 0).
//   expf is libdevice's (explicit fma inside, so --fmad=false does not change it), division IEEE.
// - top-k (TensorTopK.cu + Sort.cu): the elements whose radix key (TopKTypeConfig<float>::convert) is
//   greater than the k-th largest key, in index order, then those equal to it, in index order, as many
//   as needed (gatherTopK); then, for k > 1, SmallBitonicSort: the bitonic network of 32 slots (16
//   threads x 2, invalid slots after the k valid ones) with GTOp<float, true>. Emulated here exactly
//   (tie_mode 0), so equal probabilities come out in torch's order; tie_mode 1 orders by value, then
//   lower index first (a stable sort's order, for a torch whose top-k sorts stably).
// - renormalisation: torch.sum(dim=-1) of the contiguous float32 [T, k] values (Reduce.cuh, no input
//   vectorisation for k <= 128): block width bw = largest power of two <= k; thread t sums
//   (0 + x_t) + (0 + x_{t+bw}) + 0 + 0 (vt0 = 4 accumulators), then block_x_reduce with shfl_down over
//   bw lanes, offsets increasing 1, 2, .. (sum_order 0, older torch) or decreasing bw/2, .., 1
//   (sum_order 1, newer torch); w = x / sum.
// - cast: round to nearest even to the output dtype, or float32 kept.
//
// One warp per token row, 4 rows per CTA, no allocation, no host synchronisation.
#include <type_traits>

#include "common.cuh"
#include "moe_cuda.h"

namespace qm {
namespace cuda {

namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kRowsPerCta = 4;
constexpr int kSortSlots = 32;  // SmallBitonicSort's Power2SortSize

bool route_dtype(int dtype) { return dtype == kF32 || dtype == kF16 || dtype == kBF16; }

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (sizeof(T) == 4) {
    return v;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else {
    return __bfloat162float(v);
  }
}

// TopKTypeConfig<float>::convert: a uint32 with the float order, every NaN the largest.
__device__ __forceinline__ uint32_t radix_key(float v) {
  const uint32_t x = __float_as_uint(v);
  const uint32_t mask = (x & 0x80000000u) ? 0xffffffffu : 0x80000000u;
  return (v == v) ? (x ^ mask) : 0xffffffffu;
}

// GTOp<float, true>
__device__ __forceinline__ bool gt_nan(float a, float b) { return (isnan(a) && !isnan(b)) || (a > b); }

struct SortSlots {
  float key[kSortSlots];
  int value[kSortSlots];
  bool valid[kSortSlots];
};

// at::native::bitonicSwap
__device__ __forceinline__ void bitonic_swap(SortSlots& s, unsigned a, unsigned b, bool dir) {
  const bool swap = (gt_nan(s.key[a], s.key[b]) && s.valid[a]) || !s.valid[b];
  if (swap == dir) {
    const float k = s.key[a];
    s.key[a] = s.key[b];
    s.key[b] = k;
    const int v = s.value[a];
    s.value[a] = s.value[b];
    s.value[b] = v;
    const bool ok = s.valid[a];
    s.valid[a] = s.valid[b];
    s.valid[b] = ok;
  }
}

// at::native::bitonicSort<32> with threadIdx.x = lane 0..15 (lanes 16..31 only keep the warp in step).
__device__ __forceinline__ void bitonic_sort32(SortSlots& s, unsigned lane) {
  const bool active = lane < kSortSlots / 2;
#pragma unroll
  for (unsigned size = 2; size < kSortSlots; size *= 2) {
    const bool flag = (lane & (size / 2)) != 0;
#pragma unroll
    for (unsigned stride = size / 2; stride > 0; stride /= 2) {
      __syncwarp();
      if (active) {
        const unsigned pos = 2 * lane - (lane & (stride - 1));
        bitonic_swap(s, pos, pos + stride, flag);
      }
    }
  }
#pragma unroll
  for (unsigned stride = kSortSlots / 2; stride > 0; stride /= 2) {
    __syncwarp();
    if (active) {
      const unsigned pos = 2 * lane - (lane & (stride - 1));
      bitonic_swap(s, pos, pos + stride, false);
    }
  }
  __syncwarp();
}

template <typename O>
__device__ __forceinline__ void store_weight(void* out, int64_t i, float w) {
  if constexpr (sizeof(O) == 4) {
    static_cast<float*>(out)[i] = w;
  } else if constexpr (std::is_same_v<O, __half>) {
    static_cast<__half*>(out)[i] = __float2half_rn(w);
  } else {
    static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(w);
  }
}

// One warp per row. LOG2P: log2 of the next power of two >= E (0..10).
template <typename T, typename O, int LOG2P>
__global__ void __launch_bounds__(32 * kRowsPerCta)
    k_route_topk(const T* __restrict__ logits, int64_t rows, int E, int k, bool renorm, int sum_order,
                 int tie_mode, void* __restrict__ weights, int64_t* __restrict__ indices) {
  constexpr int P = 1 << LOG2P;
  constexpr int WS = P < 32 ? P : 32;
  constexpr int ITER = P / WS;
  __shared__ SortSlots sort_smem[kRowsPerCta];

  const unsigned lane = threadIdx.x & 31u;
  const int warp = static_cast<int>(threadIdx.x >> 5);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerCta + warp;
  if (row >= rows) return;  // whole warps leave: no shuffle below waits on them
  const T* src = logits + row * E;

  // ---- softmax (softmax_warp_forward)
  float e[ITER];
#pragma unroll
  for (int it = 0; it < ITER; ++it) {
    const int idx = static_cast<int>(lane) + it * WS;
    e[it] = (lane < WS && idx < E) ? to_float(src[idx]) : -INFINITY;
  }
  float m = e[0];
#pragma unroll
  for (int it = 1; it < ITER; ++it) m = (m > e[it]) ? m : e[it];
#pragma unroll
  for (int offset = WS / 2; offset > 0; offset /= 2) {
    const float b = __shfl_xor_sync(kFull, m, offset, WS);
    m = m < b ? b : m;
  }
  float s = 0.0f;
#pragma unroll
  for (int it = 0; it < ITER; ++it) {
    e[it] = expf(e[it] - m);
    s += e[it];
  }
#pragma unroll
  for (int offset = WS / 2; offset > 0; offset /= 2) s += __shfl_xor_sync(kFull, s, offset, WS);
#pragma unroll
  for (int it = 0; it < ITER; ++it) e[it] = (s == 0.0f) ? __int_as_float(0x7fc00000) : e[it] / s;  // quiet_NaN

  // ---- top-k set: k rounds of a warp argmax over (radix key, lower index), packed in a uint64 so that a
  // plain max picks the larger key, then the lower index. 0 = nothing left (a real entry's low word is
  // 0xffffffff - index > 0). Lane j keeps pick j.
  uint32_t picked = 0;  // bit it: element lane + it * WS already taken
  uint64_t mine = 0;
  float my_val = 0.0f;  // pick j's probability, its bits as softmax left them
  for (int j = 0; j < k; ++j) {
    uint64_t best = 0;
#pragma unroll
    for (int it = 0; it < ITER; ++it) {
      const int idx = static_cast<int>(lane) + it * WS;
      if (lane < WS && idx < E && !((picked >> it) & 1u)) {
        const uint64_t c = (static_cast<uint64_t>(radix_key(e[it])) << 32) | (0xffffffffu - static_cast<uint32_t>(idx));
        best = c > best ? c : best;
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      const uint64_t b = __shfl_xor_sync(kFull, best, offset);
      best = b > best ? b : best;
    }
    const int idx = static_cast<int>(0xffffffffu - static_cast<uint32_t>(best));
    float v = 0.0f;
    if (static_cast<int>(lane) == idx % WS) {
      picked |= 1u << (idx / WS);
#pragma unroll
      for (int it = 0; it < ITER; ++it) v = (it == idx / WS) ? e[it] : v;  // no dynamic register index
    }
    v = __shfl_sync(kFull, v, idx % WS);
    if (static_cast<int>(lane) == j) {
      mine = best;
      my_val = v;
    }
  }
  const uint32_t my_key = static_cast<uint32_t>(mine >> 32);
  const int my_idx = static_cast<int>(0xffffffffu - static_cast<uint32_t>(mine));
  const bool have = static_cast<int>(lane) < k;

  float x = 0.0f;  // this lane's slot of the sorted top-k (lane < k)
  int x_idx = 0;
  if (tie_mode == 0 && k > 1) {
    // gatherTopK's order: keys above the k-th in index order, then the k-th key's ties in index order.
    const uint32_t kth = __shfl_sync(kFull, my_key, k - 1);
    int above = 0, before = 0;
    for (int i = 0; i < k; ++i) {
      const uint32_t key_i = __shfl_sync(kFull, my_key, i);
      const int idx_i = __shfl_sync(kFull, my_idx, i);
      above += key_i > kth ? 1 : 0;
      // same class (above the k-th, or equal to it) and a lower index
      before += ((key_i > kth) == (my_key > kth) && idx_i < my_idx) ? 1 : 0;
    }
    SortSlots& slots = sort_smem[warp];
    if (have) {
      const int pos = (my_key > kth) ? before : above + before;
      slots.key[pos] = my_val;
      slots.value[pos] = my_idx;
      slots.valid[pos] = true;
    } else {
      slots.key[lane] = 0.0f;  // K{}: as torch's loader pads
      slots.value[lane] = 0;
      slots.valid[lane] = false;
    }
    __syncwarp();
    bitonic_sort32(slots, lane);
    if (have) {
      x = slots.key[lane];
      x_idx = slots.value[lane];
    }
    __syncwarp();
  } else if (have) {
    x = my_val;
    x_idx = my_idx;
  }

  // ---- renormalisation: torch.sum(dim=-1) of the [T, k] values (Reduce.cuh)
  float w = x;
  if (renorm) {
    int bw = 1;
    while (bw * 2 <= k) bw *= 2;
    const float second = __shfl_down_sync(kFull, x, bw);  // x_{lane + bw}
    float v = 0.0f;
    if (static_cast<int>(lane) < bw) {
      v = 0.0f + x;
      const float v1 = (static_cast<int>(lane) + bw < k) ? 0.0f + second : 0.0f;
      v = v + v1;
      v = v + 0.0f;  // the two unused accumulators (vt0 = 4), combined in order
      v = v + 0.0f;
    }
    if (sum_order == 0) {
      for (int offset = 1; offset < bw; offset <<= 1) v = v + __shfl_down_sync(kFull, v, offset);
    } else {
      for (int offset = bw >> 1; offset > 0; offset >>= 1) v = v + __shfl_down_sync(kFull, v, offset);
    }
    const float total = __shfl_sync(kFull, v, 0);
    w = x / total;
  }
  if (have) {
    store_weight<O>(weights, row * k + lane, w);
    indices[row * k + lane] = x_idx;
  }
}

template <typename T, typename O>
int launch_for(int log2p, const void* logits, int64_t rows, int E, int k, bool renorm, int sum_order, int tie_mode,
               void* weights, int64_t* indices, cudaStream_t st) {
  const dim3 grid(static_cast<unsigned>((rows + kRowsPerCta - 1) / kRowsPerCta));
  const dim3 block(32 * kRowsPerCta);
  const T* x = static_cast<const T*>(logits);
#define QM_ROUTE_CASE(L)                                                                                     \
  case L:                                                                                                     \
    k_route_topk<T, O, L><<<grid, block, 0, st>>>(x, rows, E, k, renorm, sum_order, tie_mode, weights, indices); \
    break;
  switch (log2p) {
    QM_ROUTE_CASE(0)
    QM_ROUTE_CASE(1)
    QM_ROUTE_CASE(2)
    QM_ROUTE_CASE(3)
    QM_ROUTE_CASE(4)
    QM_ROUTE_CASE(5)
    QM_ROUTE_CASE(6)
    QM_ROUTE_CASE(7)
    QM_ROUTE_CASE(8)
    QM_ROUTE_CASE(9)
    default:
      k_route_topk<T, O, 10><<<grid, block, 0, st>>>(x, rows, E, k, renorm, sum_order, tie_mode, weights, indices);
      break;
  }
#undef QM_ROUTE_CASE
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_out(int out_dtype, int log2p, const void* logits, int64_t rows, int E, int k, bool renorm, int sum_order,
               int tie_mode, void* weights, int64_t* indices, cudaStream_t st) {
  switch (out_dtype) {
    case kF32: return launch_for<T, float>(log2p, logits, rows, E, k, renorm, sum_order, tie_mode, weights, indices, st);
    case kF16: return launch_for<T, __half>(log2p, logits, rows, E, k, renorm, sum_order, tie_mode, weights, indices, st);
    default:
      return launch_for<T, __nv_bfloat16>(log2p, logits, rows, E, k, renorm, sum_order, tie_mode, weights, indices, st);
  }
}

}  // namespace

int route_topk(int device, uintptr_t logits, int dtype, int64_t rows, int64_t experts, int k, bool renorm,
               int out_dtype, int sum_order, int tie_mode, uintptr_t weights, uintptr_t indices, uintptr_t stream) {
  if (!route_dtype(dtype) || !route_dtype(out_dtype)) return kBadDtype;
  if (rows < 0 || rows > (int64_t{1} << 40) || experts < 1 || experts > kRouteMaxExperts || k < 1 ||
      k > kRouteMaxK || k > experts || (sum_order != 0 && sum_order != 1) || (tie_mode != 0 && tie_mode != 1))
    return kBadSize;
  if (rows == 0) return kOk;
  if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) return static_cast<int>(e);
  int log2p = 0;
  while ((int64_t{1} << log2p) < experts) ++log2p;
  const void* x = reinterpret_cast<const void*>(logits);
  void* w = reinterpret_cast<void*>(weights);
  int64_t* ids = reinterpret_cast<int64_t*>(indices);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const int E = static_cast<int>(experts);
  switch (dtype) {
    case kF32: return launch_out<float>(out_dtype, log2p, x, rows, E, k, renorm, sum_order, tie_mode, w, ids, st);
    case kF16: return launch_out<__half>(out_dtype, log2p, x, rows, E, k, renorm, sum_order, tie_mode, w, ids, st);
    default: return launch_out<__nv_bfloat16>(out_dtype, log2p, x, rows, E, k, renorm, sum_order, tie_mode, w, ids, st);
  }
}

}  // namespace cuda
}  // namespace qm
