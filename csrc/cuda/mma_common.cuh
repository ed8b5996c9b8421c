// Device helpers shared by the tensor-core GEMV kernels (gemv_mma.cu, gemv_stream.cu): cp.async
// copies, shared loads, the mma.sync m16n8k16 wrapper, the byte -> code-value-pair table, and the
// shared-memory opt-in check.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace qm {
namespace cuda {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// Copies src_bytes (0..16) and zero-fills the rest of the 16-byte destination.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, uint32_t src_bytes = 16) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}

// d += A (16 x 16, row) * B (16 x 8, col) in float32, A and B of T; bits(v): v rounded to T's bits.
template <typename T>
struct Mma;
template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t bits(float v) {
    return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(v)));
  }
};
template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t bits(float v) {
    return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(v)));
  }
};

// The byte -> pair table's entries that warp w (0..7) of a 256-thread block writes, for each of its
// lanes' copies: v[m] is the entry of byte w + 8m (m = 0..31), i.e. code values of its high nibble
// m / 2 (the first element, low half) and low nibble w + 8 (m % 2) (high half), rounded to T.
template <typename T>
__device__ __forceinline__ void pair_table_values(const float* __restrict__ quant_map, int w, uint32_t (&v)[32]) {
  uint32_t code[16];
#pragma unroll
  for (int q = 0; q < 16; ++q) code[q] = Mma<T>::bits(__ldg(quant_map + q));
  uint32_t low[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    uint32_t x = 0;
#pragma unroll
    for (int q = 0; q < 8; ++q) x = (w == q) ? code[q + 8 * h] : x;
    low[h] = x << 16;
  }
#pragma unroll
  for (int m = 0; m < 32; ++m) v[m] = code[m >> 1] | low[m & 1];
}

// Whether a block on `device` may opt into `bytes` of shared memory (H100/H200/A100: ~227/163 KB;
// RTX 30/40, L4, L40: ~99 KB). The device's limit is read once.
inline bool smem_opt_in_fits(int device, int bytes) {
  static std::atomic<int> optin[64] = {};
  if (device < 0 || device >= 64) return false;
  int v = optin[device].load();
  if (v == 0) {
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) return false;
    optin[device].store(v);
  }
  return v >= bytes;
}

}  // namespace cuda
}  // namespace qm
