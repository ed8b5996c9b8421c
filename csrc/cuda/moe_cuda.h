// Host entry points of the CUDA MoE kernels (csrc/cuda/gemv_grouped.cu). Plain C++ like qm_cuda.h:
// pointers and streams are integers, launches are asynchronous, the return value is a qm::cuda::Status
// (negative) or a cudaError_t (positive).
//
// Layout (converter/loader/moe.py): expert e's codes start at packed + e * packed_stride (+ the
// projection's byte offset, already added by the caller) and its float32 absmax at absmax + e *
// absmax_stride; the expert ids are int64 on the device and are read by the kernel, so a launch never
// waits for the host and can be captured in a CUDA graph.
#pragma once

#include <cstdint>

namespace qm {
namespace cuda {

// Grouped 4-bit GEMV: y[g, o] = sum_k x[g / x_share, k] * W_{ids[g]}[o, k] for g < groups, float32
// accumulation, y [groups, N] in x's dtype. x_share consecutive groups read one x row (1: a row per
// group; top-k: the k experts of a token; groups: one row for all, the CPU kernel's x_stride 0).
// K must be a multiple of blocksize (whole blocks per row); x, packed (+ every expert's offset) 16-byte
// aligned. An id outside 0..experts-1 gives NaN rows (no host check is possible without a sync).
// lanes: threads per output row, 8, 16 or 32; 0 picks by K (the GEMV entry points below take it too;
// benchmarks and tests force each configuration).
// `lanes` of the decode launches (glu, sum) that forces the tensor-core kernel (gemv_stream.cu; 16-bit x,
// K % 256 == 0, blocksize >= 64, k <= 8, else kBadSize); 0 takes it wherever those hold.
constexpr int kGroupedLanesMma = 1;

int gemv_4bit_grouped(int device, uintptr_t x, int dtype, int64_t groups, int64_t x_share, int64_t N, int64_t K,
                      int blocksize, uintptr_t ids, int64_t experts, uintptr_t packed, int64_t packed_stride,
                      uintptr_t absmax, int64_t absmax_stride, uintptr_t quant_map, uintptr_t y, uintptr_t stream,
                      int lanes = 0);

// Decode's fused first projection (act SiLU): h[g, r] = silu(x[g / x_share] . Wg_r) * (x[g / x_share] . Wu_r)
// for r < I, where expert e's region (at packed, absmax) holds its gate rows 0..I-1 then its up rows
// I..2I-1 of K columns; float32 dots, silu and product, one rounding to x's dtype; h [groups, I].
int gemv_4bit_grouped_glu(int device, uintptr_t x, int dtype, int64_t groups, int64_t x_share, int64_t I, int64_t K,
                          int blocksize, uintptr_t ids, int64_t experts, uintptr_t packed, int64_t packed_stride,
                          uintptr_t absmax, int64_t absmax_stride, uintptr_t quant_map, uintptr_t h,
                          uintptr_t stream, int lanes = 0);

// Decode's fused second projection and routing sum: y[t, o] = sum_{j<k} w[t k + j] * (h[t k + j] . W_{ids[t k + j]}[o])
// for t < tokens, k in 1..32 (forced lanes: 1..256 / lanes); the dots and the weighted sum (slot order)
// in float32, one rounding; y [tokens, N] in h's dtype; weights [tokens * k] of w_dtype (a DType code).
int gemv_4bit_grouped_sum(int device, uintptr_t h, int dtype, int64_t tokens, int k, int64_t N, int64_t K,
                          int blocksize, uintptr_t ids, int64_t experts, uintptr_t weights, int w_dtype,
                          uintptr_t packed, int64_t packed_stride, uintptr_t absmax, int64_t absmax_stride,
                          uintptr_t quant_map, uintptr_t y, uintptr_t stream, int lanes = 0);

// Grouped dequantize: out[i, :n] = cast(quant_map[q] * absmax) of expert ids[i]'s n weights, i < count
// (prefill: the hit experts of a layer, then one grouped matmul). n a multiple of 32 and of nothing
// else; packed (+ offsets) 16-byte aligned. An id outside 0..experts-1 gives NaN rows.
int dequantize_4bit_grouped(int device, uintptr_t ids, int64_t count, int64_t experts, uintptr_t packed,
                            int64_t packed_stride, uintptr_t absmax, int64_t absmax_stride, int64_t n,
                            int blocksize, uintptr_t quant_map, int out_dtype, uintptr_t out, uintptr_t stream);

// The router after its linear layer (route_topk.cu), one launch, one warp per row: for each of `rows` rows
// of `experts` logits (dtype code, contiguous) p = softmax(float32(logits)), the k largest p descending
// with their indices (int64), optionally divided by their sum, cast to out_dtype: bit for bit torch's
// CUDA softmax / topk / sum / div / to, given sum_order (0: torch.sum's warp offsets increasing, older
// torch; 1: decreasing, newer torch) and tie_mode (0: torch's gather + bitonic sort order of equal
// probabilities; 1: value, then lower index). experts <= kRouteMaxExperts, 1 <= k <= min(kRouteMaxK, experts).
constexpr int64_t kRouteMaxExperts = 1024;
constexpr int kRouteMaxK = 32;
int route_topk(int device, uintptr_t logits, int dtype, int64_t rows, int64_t experts, int k, bool renorm,
               int out_dtype, int sum_order, int tie_mode, uintptr_t weights, uintptr_t indices, uintptr_t stream);

}  // namespace cuda
}  // namespace qm
