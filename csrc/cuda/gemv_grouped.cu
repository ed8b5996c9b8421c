// MoE kernels on CUDA (moe_cuda.h): the grouped 4-bit GEMV of decode and the grouped dequantize of
// prefill, both indexed by expert ids that live on the device.
//
// Grouped GEMV: the same arithmetic as gemv.cu's CUDA-core kernel (and the CPU grouped kernel row by
// row): a lane takes 32 weights (16 bytes) of a row per chunk, sums quant_map[q] * x over them with
// float32 FMAs, scales that sum by the chunk's absmax with an FMA (a chunk never straddles a block:
// blocksize >= 32) and the lanes of a row add their sums in a fixed butterfly order. Grid (row tiles,
// groups): the expert of a group is read from ids[blockIdx.y], so one launch covers every routed
// (token, expert) pair of a decode step.
//
// Decode is bound by memory latency unless many bytes are in flight from the first cycle: a row gets
// L = 8, 16 or 32 lanes and a lane starts the copies of its next C <= 4 chunks (codes and absmax, into
// shared memory with cp.async) before any math, L and C compile-time (pick_config: the fewest lanes
// that cover a row in one round of at most 4 chunks, C = the chunks a lane then has). Qwen3-30B-A3B:
// gate/up K = 2048 is 64 chunks -> 16 lanes x 4 chunks (x 2 rows, gate and up), down K = 768 is 24
// chunks -> 8 lanes x 3. Longer rows repeat the round (32 lanes x 4 chunks).
//
// With 16-bit activations the two decode launches (glu, sum) take the tensor-core kernel of
// gemv_stream.cu instead where its layout allows (K % 256 == 0, blocksize >= 64, k <= 8): ~6 instructions
// per weight here (ncu, H100, Qwen3-30B-A3B's gate/up: 4.7 M warp instructions, 0.4 issued per cycle)
// against ~2.5 there. lanes = kGroupedLanesMma forces it, 8 / 16 / 32 force these kernels.
#include "common.cuh"
#include "gemv_stream.cuh"
#include "moe_cuda.h"

namespace qm {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kChunksPerLane = 4;                // chunks whose loads a lane issues before any math
constexpr int kMinLanes = 8, kMaxLanes = 32;     // lanes per row: 8, 16 or 32
constexpr int kMaxSlots = kThreads / kMinLanes;  // rows (or row slots) of a CTA at 8 lanes: 32

// 8 elements of x at element offset off, widened to float32 (read-only cache: x is reused by every row).
template <typename T>
__device__ __forceinline__ void x8(const T* __restrict__ x, int64_t off, float* v) {
  const uint4* p = reinterpret_cast<const uint4*>(x + off);
  widen16(__ldg(p), v, x);
  if constexpr (sizeof(T) == 4) widen16(__ldg(p + 1), v + 4, x);
}

// Asynchronous copies global -> shared (sm_80+): a lane's loads are in flight without holding registers,
// so the compiler can neither sink them below earlier math nor trade them for occupancy (register loads
// it does both with). 16 bytes of codes bypass L1 (read once); 4 bytes of absmax go through it.
__device__ __forceinline__ void copy16_async(uint4* dst, const uint4* src) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
}

__device__ __forceinline__ void copy4_async(float* dst, const float* src) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(d), "l"(src) : "memory");
}

// Close the group of copies started since the last commit (one group per chunk slot, maybe empty).
__device__ __forceinline__ void commit_copies() { asm volatile("cp.async.commit_group;" ::: "memory"); }

// Wait until at most n (a constant once unrolled, 0..3) of this thread's groups are in flight: each
// thread reads back only what it copied, so no barrier is needed.
__device__ __forceinline__ void wait_copies(int n) {
  switch (n) {
    case 0: asm volatile("cp.async.wait_group 0;" ::: "memory"); break;
    case 1: asm volatile("cp.async.wait_group 1;" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 2;" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 3;" ::: "memory"); break;
  }
}

// quant_map[q] from the 16-entry shared table at shared address qm, given off4 = 4 q. The table is
// 64-byte aligned, so the offset is ORed in: the nibble's shift, mask and address take two instructions
// (SHF, LOP3) instead of three (an add of the table's address).
__device__ __forceinline__ float code_value(uint32_t qm, uint32_t off4) {
  float v;
  asm("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(qm | off4));
  return v;
}

// A CTA's staging area: per thread C x R chunks of codes and their absmax, [slot][thread] so that the
// threads of a warp touch consecutive words (no bank conflicts).
template <int C, int R>
struct Staging {
  uint4 codes[C * R][kThreads];
  float absmax[C * R][kThreads];
};

// This lane's share of R dot products x . W_r (rows of 4-bit codes at wp[r], their absmax at ap[r]),
// sharing each widened x word between the R rows: the lane takes chunks sub, sub + L, sub + 2L, ... of
// 32 weights. Per round it starts the copies of the codes and absmax of its next C chunks (a group per
// chunk), then, as each chunk lands, sums quant_map[q] * x over it with float32 FMAs and adds that sum
// times the chunk's absmax, in chunk order (a fixed order: the result does not depend on timing).
template <typename T, int L, int C, int R>
__device__ __forceinline__ void lane_dots(const T* __restrict__ xr, const uint8_t* const (&wp)[R],
                                          const float* const (&ap)[R], const float* s_qm, Staging<C, R>& st,
                                          int64_t K, int log2bs, int sub, float (&acc)[R]) {
  const int64_t chunks = K >> 5;
  const int tid = threadIdx.x;
  const uint32_t qm = static_cast<uint32_t>(__cvta_generic_to_shared(s_qm));
  for (int64_t base = sub; base < chunks; base += int64_t{L} * C) {
#pragma unroll
    for (int i = 0; i < C; ++i) {  // every copy of the round first: C x R x 16 bytes in flight per lane
      const int64_t c = base + int64_t{i} * L;
      if (c < chunks) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          copy16_async(&st.codes[i * R + r][tid], reinterpret_cast<const uint4*>(wp[r]) + c);
          copy4_async(&st.absmax[i * R + r][tid], ap[r] + ((c << 5) >> log2bs));
        }
      }
      commit_copies();
    }
#pragma unroll
    for (int i = 0; i < C; ++i) {
      const int64_t c = base + int64_t{i} * L;
      if (c >= chunks) break;  // x beyond the row is not read; the later groups are empty
      wait_copies(C - 1 - i);  // chunk i's group has landed (groups complete in commit order)
      uint4 w[R];
      float part[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        w[r] = st.codes[i * R + r][tid];
        part[r] = 0.0f;
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
            const uint32_t hi4 = (word >> (8 * j + 2)) & 0x3Cu;
            const uint32_t lo4 = (j == 0 ? word << 2 : word >> (8 * j - 2)) & 0x3Cu;
            part[r] = __fmaf_rn(code_value(qm, hi4), xv[2 * j], part[r]);
            part[r] = __fmaf_rn(code_value(qm, lo4), xv[2 * j + 1], part[r]);
          }
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] = __fmaf_rn(st.absmax[i * R + r][tid], part[r], acc[r]);
    }
  }
}

// Sum over the L lanes of a row (aligned groups of L lanes), fixed butterfly order; every lane gets the
// sum. All 32 lanes of the warp must call it (no lane may have returned).
template <int L>
__device__ __forceinline__ float row_sum(float v) {
#pragma unroll
  for (int off = L / 2; off >= 1; off >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// The 16 code values into shared memory, read by every thread of the CTA after the barrier (all threads
// must call it).
__device__ __forceinline__ void load_quant_map(const float* __restrict__ quant_map, float* s_qm) {
  if (threadIdx.x < 16) s_qm[threadIdx.x] = __ldg(quant_map + threadIdx.x);
  __syncthreads();
}

// y[g, row] = x[g / x_share] . W_ids[g][row]; kThreads / L rows per CTA, C chunks per lane and round.
template <typename T, int L, int C>
__global__ void __launch_bounds__(kThreads)
k_gemv_grouped(const T* __restrict__ x, int64_t x_share, const int64_t* __restrict__ ids, int64_t experts,
               const uint8_t* __restrict__ packed, int64_t packed_stride, const float* __restrict__ absmax,
               int64_t absmax_stride, const float* __restrict__ quant_map, T* __restrict__ y, int64_t N,
               int64_t K, int log2bs) {
  __shared__ __align__(64) float s_qm[16];
  __shared__ Staging<C, 1> st;
  load_quant_map(quant_map, s_qm);
  const int64_t g = blockIdx.y;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / L) + threadIdx.x / L;
  const int sub = threadIdx.x % L;
  const int64_t e = __ldg(ids + g);
  const bool live = row < N, known = e >= 0 && e < experts;
  float acc[1] = {0.0f};
  if (live && known) {  // no early return: every lane takes part in the shuffles below
    const uint8_t* const wp[1] = {packed + e * packed_stride + ((row * K) >> 1)};
    const float* const ap[1] = {absmax + e * absmax_stride + ((row * K) >> log2bs)};
    lane_dots<T, L, C, 1>(x + (g / x_share) * K, wp, ap, s_qm, st, K, log2bs, sub, acc);
  }
  const float s = row_sum<L>(acc[0]);
  if (live && sub == 0) y[g * N + row] = Elem<T>::from(known ? s : nan_f());
}

// Decode's first projection with its activation: h[g, r] = silu(x . Wg_r) * (x . Wu_r), r < I, where the
// expert's gate rows are rows 0..I-1 of its gate_up region and its up rows I..2I-1.
template <typename T, int L, int C>
__global__ void __launch_bounds__(kThreads)
k_gemv_grouped_glu(const T* __restrict__ x, int64_t x_share, const int64_t* __restrict__ ids, int64_t experts,
                   const uint8_t* __restrict__ packed, int64_t packed_stride, const float* __restrict__ absmax,
                   int64_t absmax_stride, const float* __restrict__ quant_map, T* __restrict__ h, int64_t I,
                   int64_t K, int log2bs) {
  __shared__ __align__(64) float s_qm[16];
  __shared__ Staging<C, 2> st;
  load_quant_map(quant_map, s_qm);
  const int64_t g = blockIdx.y;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / L) + threadIdx.x / L;
  const int sub = threadIdx.x % L;
  const int64_t e = __ldg(ids + g);
  const bool live = row < I, known = e >= 0 && e < experts;
  float acc[2] = {0.0f, 0.0f};
  if (live && known) {
    const uint8_t* base = packed + e * packed_stride;
    const float* abase = absmax + e * absmax_stride;
    const uint8_t* const wp[2] = {base + ((row * K) >> 1), base + (((I + row) * K) >> 1)};
    const float* const ap[2] = {abase + ((row * K) >> log2bs), abase + (((I + row) * K) >> log2bs)};
    lane_dots<T, L, C, 2>(x + (g / x_share) * K, wp, ap, s_qm, st, K, log2bs, sub, acc);
  }
  const float gate = row_sum<L>(acc[0]), up = row_sum<L>(acc[1]);
  if (live && sub == 0) h[g * I + row] = Elem<T>::from(known ? silu_mul(gate, up) : nan_f());
}

// Decode's second projection and the routing sum: y[t, row] = sum_j w[t, j] * (h[t k + j] . W_ids[t k + j][row]).
// The kThreads / L slots of L lanes of a CTA take (row, j) pairs, rows_per_cta = slots / k rows of one
// token t, so a CTA streams k experts' rows at once; the k float32 dot products meet in shared memory
// and one thread per row adds them, weighted, in slot order (j = 0..k-1) and rounds once to T. k <= slots.
template <typename T, int L, int C>
__global__ void __launch_bounds__(kThreads)
k_gemv_grouped_sum(const T* __restrict__ h, int k, const int64_t* __restrict__ ids, int64_t experts,
                   const void* __restrict__ weights, int w_dtype, const uint8_t* __restrict__ packed,
                   int64_t packed_stride, const float* __restrict__ absmax, int64_t absmax_stride,
                   const float* __restrict__ quant_map, T* __restrict__ y, int64_t N, int64_t K, int log2bs) {
  constexpr int kSlots = kThreads / L;
  __shared__ __align__(64) float s_qm[16];
  __shared__ float s_dot[kSlots];
  __shared__ float s_wt[kSlots];
  __shared__ int s_known[kSlots];
  __shared__ Staging<C, 1> st;
  load_quant_map(quant_map, s_qm);
  const int rows_per_cta = kSlots / k;
  const int64_t t = blockIdx.y;
  const int slot = threadIdx.x / L, sub = threadIdx.x % L;
  const int local = slot / k, j = slot % k;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_cta + local;
  const bool live = local < rows_per_cta && row < N;
  const int64_t g = t * k + j;
  const int64_t e = live ? __ldg(ids + g) : 0;
  const bool known = e >= 0 && e < experts;
  // The slot's routing weight, loaded now so that its latency hides under the weight stream (read after
  // the barrier below).
  if (sub == 0) s_wt[slot] = live ? load_weight(weights, w_dtype, g) : 0.0f;
  float part[1] = {0.0f};
  if (live && known) {  // no early return: every lane takes part in the shuffles below
    const uint8_t* const wp[1] = {packed + e * packed_stride + ((row * K) >> 1)};
    const float* const ap[1] = {absmax + e * absmax_stride + ((row * K) >> log2bs)};
    lane_dots<T, L, C, 1>(h + g * K, wp, ap, s_qm, st, K, log2bs, sub, part);
  }
  const float dot = row_sum<L>(part[0]);
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
        acc = __fmaf_rn(s_wt[threadIdx.x * k + i], s_dot[threadIdx.x * k + i], acc);
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
  __shared__ __align__(64) float s_qm[16];
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
constexpr int64_t kMinRowsPerCta = kThreads / kMaxLanes;  // grid x is rows / rows per CTA, at most rows / 8

// The element types the kernels are instantiated for (dispatch's cases).
bool valid_dtype(int dtype) { return dtype == kF32 || dtype == kF16 || dtype == kBF16; }

// Checks shared by the GEMV entry points: rows [rows, K] of whole blocks, every expert's rows inside its
// stride, 16-byte aligned x and codes.
int check_gemv(int dtype, int blocksize, int64_t grid_y, int64_t rows, int64_t K, const ExpertsArg& a,
               uintptr_t x) {
  if (!valid_blocksize(blocksize)) return kBadBlocksize;
  if (!valid_dtype(dtype)) return kBadDtype;
  if (grid_y < 0 || grid_y > kMaxGridY || rows < 0 || K <= 0 || K % blocksize != 0 || a.experts < 1 ||
      (rows > 0 && K > (int64_t{1} << 40) / rows) || rows / kMinRowsPerCta >= (int64_t{1} << 30))
    return kBadSize;
  if (a.ps < rows * K / 2 || a.as < rows * (K / blocksize) || a.ps % 16 != 0 || !aligned16(x) ||
      !aligned16(reinterpret_cast<uintptr_t>(a.packed)))
    return kBadSize;
  return kOk;
}

// The tensor-core launches' arguments shared by glu and sum.
void fill_mma_args(GroupedMmaArgs& m, const ExpertsArg& a, uintptr_t x, uintptr_t y, int64_t groups, int64_t rows,
                   int64_t K, int blocksize, cudaStream_t st) {
  m.x = reinterpret_cast<const void*>(x);
  m.ids = a.ids;
  m.experts = a.experts;
  m.packed = a.packed;
  m.packed_stride = a.ps;
  m.absmax = a.absmax;
  m.absmax_stride = a.as;
  m.quant_map = a.qm;
  m.y = reinterpret_cast<void*>(y);
  m.groups = groups;
  m.rows = rows;
  m.K = K;
  m.log2bs = ilog2(blocksize);
  m.st = st;
}

unsigned tiles(int64_t rows, int64_t per) { return static_cast<unsigned>((rows + per - 1) / per); }

// A launch's compile-time shape: L lanes per row, C chunks per lane and round.
struct Config {
  int lanes, chunks;
};

// C for L lanes: the chunks a lane has in one round (at most 4), among the instantiated ones.
int chunks_per_lane(int lanes, int64_t K) {
  const int64_t per = ((K >> 5) + lanes - 1) / lanes;
  if (lanes == 8) return static_cast<int>(per < 1 ? 1 : per > 4 ? 4 : per);
  if (lanes == 16) return per <= 3 ? 3 : 4;
  return per <= 2 ? 2 : 4;
}

// `lanes` forced (8, 16 or 32) or 0: the fewest lanes that cover a row in one round of 4 chunks, 32 for
// longer rows. {0, 0} for any other `lanes`.
Config pick_config(int lanes, int64_t K) {
  if (lanes == 0) {
    lanes = kMinLanes;
    while (lanes < kMaxLanes && (K >> 5) > int64_t{lanes} * kChunksPerLane) lanes *= 2;
  }
  if (lanes != 8 && lanes != 16 && lanes != 32) return Config{0, 0};
  return Config{lanes, chunks_per_lane(lanes, K)};
}

template <int L, int C>
struct Shape {
  static constexpr int kLanes = L, kChunks = C;
};

// f(Shape<L, C>{}) for the config: the kernels' instantiations.
template <typename F>
void with_config(Config c, F&& f) {
  if (c.lanes == 8) {
    switch (c.chunks) {
      case 1: f(Shape<8, 1>{}); break;
      case 2: f(Shape<8, 2>{}); break;
      case 3: f(Shape<8, 3>{}); break;
      default: f(Shape<8, 4>{}); break;
    }
  } else if (c.lanes == 16) {
    if (c.chunks == 3) f(Shape<16, 3>{}); else f(Shape<16, 4>{});
  } else {
    if (c.chunks == 2) f(Shape<32, 2>{}); else f(Shape<32, 4>{});
  }
}

template <typename T>
void launch_plain(Config cfg, const void* x, int64_t groups, int64_t x_share, int64_t N, int64_t K, int l,
                  const ExpertsArg& a, void* y, cudaStream_t st) {
  with_config(cfg, [&](auto shape) {
    constexpr int L = decltype(shape)::kLanes, C = decltype(shape)::kChunks;
    k_gemv_grouped<T, L, C><<<dim3(tiles(N, kThreads / L), static_cast<unsigned>(groups)), kThreads, 0, st>>>(
        static_cast<const T*>(x), x_share, a.ids, a.experts, a.packed, a.ps, a.absmax, a.as, a.qm,
        static_cast<T*>(y), N, K, l);
  });
}

template <typename T>
void launch_glu(Config cfg, const void* x, int64_t groups, int64_t x_share, int64_t I, int64_t K, int l,
                const ExpertsArg& a, void* h, cudaStream_t st) {
  with_config(cfg, [&](auto shape) {
    constexpr int L = decltype(shape)::kLanes, C = decltype(shape)::kChunks;
    k_gemv_grouped_glu<T, L, C><<<dim3(tiles(I, kThreads / L), static_cast<unsigned>(groups)), kThreads, 0, st>>>(
        static_cast<const T*>(x), x_share, a.ids, a.experts, a.packed, a.ps, a.absmax, a.as, a.qm,
        static_cast<T*>(h), I, K, l);
  });
}

template <typename T>
void launch_sum(Config cfg, const void* h, int64_t tokens, int k, const void* w, int w_dtype, int64_t N, int64_t K,
                int l, const ExpertsArg& a, void* y, cudaStream_t st) {
  with_config(cfg, [&](auto shape) {
    constexpr int L = decltype(shape)::kLanes, C = decltype(shape)::kChunks;
    const int rows_per_cta = kThreads / L / k;
    k_gemv_grouped_sum<T, L, C><<<dim3(tiles(N, rows_per_cta), static_cast<unsigned>(tokens)), kThreads, 0, st>>>(
        static_cast<const T*>(h), k, a.ids, a.experts, w, w_dtype, a.packed, a.ps, a.absmax, a.as, a.qm,
        static_cast<T*>(y), N, K, l);
  });
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
                      uintptr_t absmax, int64_t absmax_stride, uintptr_t quant_map, uintptr_t y, uintptr_t stream,
                      int lanes) {
  const ExpertsArg a = experts_arg(ids, experts, packed, packed_stride, absmax, absmax_stride, quant_map);
  if (int s = check_gemv(dtype, blocksize, groups, N, K, a, x); s != kOk) return s;
  const Config cfg = pick_config(lanes, K);
  if (x_share < 1 || cfg.lanes == 0) return kBadSize;
  if (groups == 0 || N == 0) return kOk;
  if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) return static_cast<int>(e);
  return dispatch<Plain>(dtype, cfg, reinterpret_cast<const void*>(x), groups, x_share, N, K, ilog2(blocksize), a,
                         reinterpret_cast<void*>(y), reinterpret_cast<cudaStream_t>(stream));
}

int gemv_4bit_grouped_glu(int device, uintptr_t x, int dtype, int64_t groups, int64_t x_share, int64_t I, int64_t K,
                          int blocksize, uintptr_t ids, int64_t experts, uintptr_t packed, int64_t packed_stride,
                          uintptr_t absmax, int64_t absmax_stride, uintptr_t quant_map, uintptr_t h,
                          uintptr_t stream, int lanes) {
  const ExpertsArg a = experts_arg(ids, experts, packed, packed_stride, absmax, absmax_stride, quant_map);
  if (int s = check_gemv(dtype, blocksize, groups, 2 * I, K, a, x); s != kOk) return s;
  const bool fits = grouped_mma_supported(device, dtype, K, blocksize, x, packed, packed_stride, absmax,
                                         absmax_stride, 1);
  if (lanes == kGroupedLanesMma && !fits) return kBadSize;
  const bool mma = fits && (lanes == 0 || lanes == kGroupedLanesMma);
  const Config cfg = pick_config(mma ? 0 : lanes, K);
  if (x_share < 1 || cfg.lanes == 0) return kBadSize;
  if (groups == 0 || I == 0) return kOk;
  if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) return static_cast<int>(e);
  if (mma) {
    GroupedMmaArgs m{};
    fill_mma_args(m, a, x, h, groups, I, K, blocksize, reinterpret_cast<cudaStream_t>(stream));
    m.x_share = x_share;
    return static_cast<int>(launch_grouped_glu_mma(m, dtype, device));
  }
  return dispatch<Glu>(dtype, cfg, reinterpret_cast<const void*>(x), groups, x_share, I, K, ilog2(blocksize), a,
                       reinterpret_cast<void*>(h), reinterpret_cast<cudaStream_t>(stream));
}

int gemv_4bit_grouped_sum(int device, uintptr_t h, int dtype, int64_t tokens, int k, int64_t N, int64_t K,
                          int blocksize, uintptr_t ids, int64_t experts, uintptr_t weights, int w_dtype,
                          uintptr_t packed, int64_t packed_stride, uintptr_t absmax, int64_t absmax_stride,
                          uintptr_t quant_map, uintptr_t y, uintptr_t stream, int lanes) {
  const ExpertsArg a = experts_arg(ids, experts, packed, packed_stride, absmax, absmax_stride, quant_map);
  if (int s = check_gemv(dtype, blocksize, tokens, N, K, a, h); s != kOk) return s;
  if (k < 1 || k > kMaxSlots || tokens * k > (int64_t{1} << 40)) return kBadSize;
  const bool fits = grouped_mma_supported(device, dtype, K, blocksize, h, packed, packed_stride, absmax,
                                         absmax_stride, k);
  if (lanes == kGroupedLanesMma && !fits) return kBadSize;
  const bool mma = fits && (lanes == 0 || lanes == kGroupedLanesMma);
  if (mma) lanes = 0;
  Config cfg = pick_config(lanes, K);
  if (lanes == 0) {  // auto: fewer lanes where a CTA's slots cannot hold the k experts of a row
    while (kThreads / cfg.lanes < k) cfg = pick_config(cfg.lanes / 2, K);
  } else if (cfg.lanes == 0 || kThreads / cfg.lanes < k) {
    return kBadSize;
  }
  if (!valid_dtype(w_dtype)) return kBadDtype;
  if (tokens == 0 || N == 0) return kOk;
  if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) return static_cast<int>(e);
  if (mma) {
    GroupedMmaArgs m{};
    fill_mma_args(m, a, h, y, tokens, N, K, blocksize, reinterpret_cast<cudaStream_t>(stream));
    m.k = k;
    m.weights = reinterpret_cast<const void*>(weights);
    m.w_dtype = w_dtype;
    return static_cast<int>(launch_grouped_sum_mma(m, dtype, device));
  }
  return dispatch<Sum>(dtype, cfg, reinterpret_cast<const void*>(h), tokens, k,
                       reinterpret_cast<const void*>(weights), w_dtype, N, K, ilog2(blocksize), a,
                       reinterpret_cast<void*>(y), reinterpret_cast<cudaStream_t>(stream));
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
