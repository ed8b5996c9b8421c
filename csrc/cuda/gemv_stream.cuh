// Lean tensor-core 4-bit GEMV ("stream" variant, csrc/cuda/gemv_stream.cu), called by gemv.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "gemv_mma.cuh"

namespace qm {
namespace cuda {

// Variant codes of gemv_4bit (qm_cuda.h) that pick this kernel: auto split, forced intra-CTA split
// 1/2/4/8 (one K slice), forced K slices 2/4/8 across CTAs (auto intra-CTA split).
constexpr int kStreamAuto = 11;
constexpr int kStreamLast = 18;
constexpr int kMmaAuto = 20;  // the tensor-core kernel of gemv_mma.cu with its own split choice
inline bool is_stream_variant(int v) { return v >= kStreamAuto && v <= kStreamLast; }

// THE default selector: whether variant 0 (the default) takes this kernel for a shape (where
// gemv_stream_supported; else the gemv_mma.cu / CUDA-core kernels). Set from bench/bench_gemv_cuda.py's
// table (a one-line change). Untimed on A100-class GPUs, where it fits one block per SM.
inline bool gemv_stream_preferred(int64_t N, int64_t K, int batch) {
  // Measured on an H200 (bench/bench_gemv_cuda.py, docs/benchmarks.md, 2026-12-04): faster than the
  // tensor-core kernel on all 14 shape x batch rows (28672x8192 batch 1: 85% of the copy floor vs 66%).
  (void)N, (void)K, (void)batch;
  return true;
}

// Layouts this kernel takes: 16-bit x, K % 256 == 0 and K % blocksize == 0, blocksize >= 64 (a
// 64-weight segment never straddles a block), 16-byte aligned x, packed, absmax and nested codes,
// and a device that grants its ~106 KB of shared memory per block.
bool gemv_stream_supported(int device, int dtype, int64_t K, int blocksize, uintptr_t x, uintptr_t packed,
                           uintptr_t absmax, uintptr_t ncodes);

// float32 scratch elements the launch for these arguments needs (0: none), for the cross-CTA K split.
int64_t gemv_stream_scratch(int device, int batch, int64_t N, int64_t K, int variant);

// Launch; scratch (float32, gemv_stream_scratch elements, may be null when that is 0) holds the
// per-slice partial sums of a cross-CTA K split, summed in slice order by a second kernel.
cudaError_t launch_gemv_stream(const GemvMmaArgs& a, int dtype, int device, int variant, float* scratch);

// Several weights in one launch (q/k/v, gate/up): a[0..n) (n = 1..4) share x, batch, K, log2bs and the
// stream; each has its own codes, absmax, tables, N and y. One plan for their rows together; scratch:
// gemv_stream_scratch(device, batch, sum of N, K, variant) elements (per weight its own plane).
// The same per-CTA code as launch_gemv_stream (which is the n = 1 case).
cudaError_t launch_gemv_stream_multi(const GemvMmaArgs* a, int n, int dtype, int device, int variant,
                                     float* scratch);

// MoE decode on the tensor-core kernel (the same per-CTA code, csrc/cuda/gemv_stream.cu), called by
// gemv_grouped.cu's entry points (moe_cuda.h) for 16-bit activations. Expert e's region: its codes at
// packed + e * packed_stride, its float32 absmax at absmax + e * absmax_stride; ids (int64) on the device,
// an id outside 0..experts-1 gives NaN rows.
struct GroupedMmaArgs {
  const void* x;  // glu: x [groups / x_share, K]; sum: h [groups * k, K]
  const int64_t* ids;
  int64_t experts;
  const uint8_t* packed;
  int64_t packed_stride;
  const float* absmax;
  int64_t absmax_stride;
  const float* quant_map;
  void* y;          // glu: h [groups, rows]; sum: y [groups, rows]
  int64_t groups;   // glu: (token, slot) pairs; sum: tokens
  int64_t x_share;  // glu: groups per x row
  int64_t rows;     // glu: I (gate rows; up rows follow); sum: N
  int64_t K;
  int log2bs;
  int k;  // sum: experts per token (<= 8)
  const void* weights;  // sum: routing weights [groups * k] of DType w_dtype
  int w_dtype;
  cudaStream_t st;
};

// What the grouped launches take: gemv_stream_supported's layouts, 16-byte aligned expert strides, and
// for the routing sum k <= 8 (a warp per expert of a row tile).
bool grouped_mma_supported(int device, int dtype, int64_t K, int blocksize, uintptr_t x, uintptr_t packed,
                           int64_t packed_stride, uintptr_t absmax, int64_t absmax_stride, int k);

// h = silu(x W_gate^T) * (x W_up^T) per group; float32 dots on tensor cores (code values rounded to x's
// dtype), silu and product in float32, one rounding.
cudaError_t launch_grouped_glu_mma(const GroupedMmaArgs& a, int dtype, int device);

// y[t] = sum_j w[t k + j] * (h[t k + j] W_{ids[t k + j]}^T), slot order, float32, one rounding.
cudaError_t launch_grouped_sum_mma(const GroupedMmaArgs& a, int dtype, int device);

}  // namespace cuda
}  // namespace qm
