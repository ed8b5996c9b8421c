// Lean tensor-core 4-bit GEMV / small-batch GEMM for fp16 and bf16 activations ("stream" variant):
// y[b, o] = sum_k x[b, k] * W[o, k] for b < B (1..8), on mma.sync m16n8k16 with float32 accumulators.
//
// Why a second tensor-core kernel: gemv_mma.cu spends ~550 instructions per lane per 16 x 256 tile on
// an H100/H200 (SASS count), of which only ~220 are the decode and the mma; the rest is the general
// tile/absmax handling (partial tiles, any blocksize, absmax windows decoded by every lane of a row
// group). At the H200's 4.2 TB/s that makes it issue-bound near 45% of the memory floor. This kernel
// takes the common layout only (K % 256 == 0, blocksize >= 64) and cuts the per-tile work to ~300:
//
// - k order: within each 64-weight segment (32 bytes of codes, inside one absmax block because
//   blocksize >= 64), lane (g, c) takes bytes 8c..8c+7 of rows g and g + 8 with one 8-byte shared
//   load each; mma i (0..3) of the segment uses bytes 2i and 2i + 1 (its a0/a2 and a1/a3 registers),
//   i.e. weights 16c + 4i .. 16c + 4i + 3. The activation fragment is read in the same order
//   (x[16c .. 16c + 15] of the segment, two 16-byte loads), so the permutation cancels.
// - decode: the 256-entry byte -> pair-of-16-bit-code-values table of gemv_mma.cu, one copy per lane
//   (conflict-free), laid out with a 256-byte row per byte value (entry byte * 256 + lane * 4), so one
//   byte permute builds the whole table offset (lane * 4 in byte 0, the code byte in byte 1) and the
//   table base folds into the shared load: two instructions per byte instead of three. The other
//   128 bytes of each row hold the code stages (below), so the layout costs no shared memory.
// - absmax: each (row, segment) absmax of a tile is decoded once per warp (lane l: row l % 16,
//   segments 2 (l / 16) and 2 (l / 16) + 1, nested decoded inline as map8[code] * nested_absmax +
//   offset, a separate multiply and add as dequantize_4bit does), parked in shared memory and read back
//   by the lanes that need it with two 16-byte loads, instead of four lanes decoding each value.
// - data movement: 16 rows x 256 weights of codes (2 KB) plus each row's 16-byte absmax window per
//   tile through a 3-stage cp.async ring per warp; rows past N read row N - 1 (results dropped), so
//   there are no per-row predicates. A stage row (128 bytes) sits in the second half of a 256-byte
//   grid row; its four 32-byte segments are XOR-swizzled by the row (segment s at (s ^ (row & 3)) * 32)
//   so the 8-byte loads of four rows of a half-warp hit four different bank quarters.
// - work split: `split` warps of a CTA share a 16-row tile (every split-th k tile) and meet in shared
//   memory in warp order; a CTA takes 8 / split row tiles, at split 1 fewer where that evens out the row
//   tiles per multiprocessor (28672 rows: 7 per CTA, one warp idle); for thin shapes the K range is also cut into `ks` slices across CTAs
//   (grid.y) whose float32 partial sums go to a scratch buffer, summed in slice order by a second tiny
//   kernel: deterministic, no atomics.
//
// - several weights per launch (q/k/v, gate/up: the same x and K): k_gemv_stream_multi lays the CTAs of
//   up to 4 weights one after another along grid.x; a CTA finds its weight from the prefix CTA counts
//   in the kernel parameters and runs the same per-CTA code (stream_cta) with that weight's Params. One
//   plan (split, row tiles per CTA, K slices) for the rows of all the weights together; each weight's
//   K-slice partial sums in a plane of its own, summed into its y by k_sum_slices_multi. A batch-1
//   decoder's small projections (1024..4096 rows) fill the GPU together where each alone does not.
//   The one-weight launch keeps its own entry (k_gemv_stream, the same SASS as before the split).
// - MoE decode (k_grouped_glu_mma, k_grouped_sum_mma, called by gemv_grouped.cu for 16-bit x): the same
//   per-CTA code (stream_cta<T, kGlu / kSum>) over the region of the expert each CTA or warp reads from
//   the device-side ids: gate/up row tiles in pairs with silu(gate) * up in the epilogue, or a token's k
//   experts one warp each with the routing-weighted sum in slot order in the epilogue. On an H100 at
//   Qwen3-30B-A3B's shapes 1.2-1.4x faster than the CUDA-core kernels (~6 instructions per weight there);
//   the dense kernels' SASS is unchanged (instruction counts compared, docs/benchmarks.md round 32).
//
// Where the time goes (ncu on an H200, 28672x8192 batch 1, round 24): ~140 wavefronts per 16 x 256 tile
// through the L1/shared-memory data pipe (74% busy): 64 table lookups, 16 code reads, ~27 for the
// cp.async copies, ~14 absmax, ~9 x, ~7 stores; DRAM at 52% of its peak, 0.4 issues per scheduler, 3.6
// active warps per scheduler (124 registers: 25% occupancy), 0.67 eligible. Two ways of unloading the
// pipe were built and measured in round 25 (docs/benchmarks.md) and are not here, because neither is
// faster: staging the codes by TMA (cp.async.bulk.tensor.2d, 128-byte swizzle; branch gemvtma) runs
// as fast on 28672x8192 and 14336x4096 and 8-10% slower on the others; decoding code bytes by byte permutes
// of register-held byte planes instead of the table (exact; branch regdecode) costs time in proportion
// to the instructions it adds (all words: 1.73x). The kernel is latency-bound at 4 warps per scheduler,
// each tile one dependent chain (permute -> shared load -> mma): the lever left is more warps per
// multiprocessor (fewer registers, less shared memory) or more independent work per warp (branch
// occupancy: three CTAs per multiprocessor at 80 registers, written, not yet measured).
//
// Arithmetic: the code value rounded to x's dtype (the table), mma products summed in float32 (tensor
// cores: truncating accumulation), each 64-weight segment's sum scaled by its block's absmax with an
// FMA into float32 accumulators, split partial sums added in float32, one rounding to x's dtype: the
// same error class as gemv_mma.cu (tests/error_bounds.py gemv_arithmetic("cuda", 16-bit dtype)).
#include "gemv_stream.cuh"

#include <atomic>

#include "common.cuh"
#include "mma_common.cuh"

namespace qm {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kStages = 3;
constexpr int kTileWeights = 256;                 // per row per k tile
constexpr int kTileBytes = kTileWeights / 2;      // 128
// The grid: 256-byte rows; row h holds table entries of byte value h (h < 256) in bytes 0..127 and
// stage row h (codes of one weight row of one tile; stage row = (warp * kStages + stage) * 16 + row)
// in bytes 128..255.
constexpr int kGridRowBytes = 256;
constexpr int kStageRows = kWarps * kStages * 16;  // 384
constexpr int kGridRows = kStageRows > 256 ? kStageRows : 256;
constexpr int kGridBytes = kGridRows * kGridRowBytes;
constexpr int kMetaStride = 16;                    // per row: 4 nested codes + nested absmax, or 4 floats
constexpr int kMetaBytes = 16 * kMetaStride;       // per stage
constexpr int kAmBytes = 16 * 4 * 4;               // decoded absmax: 16 rows x 4 segments
constexpr int kWarpBytes = kStages * kMetaBytes + kAmBytes;
constexpr int kMap8Off = kGridBytes;
constexpr int kWarpOff = kMap8Off + 256 * 4;
constexpr int kSmemBytes = kWarpOff + kWarps * kWarpBytes;
static_assert(kWarpBytes % 16 == 0 && kWarpOff % 16 == 0, "16-byte aligned meta");
static_assert(kStages * kMetaBytes >= 32 * 4 * 4, "a warp's partial sums fit in its meta stages");
static_assert(2 * (kSmemBytes + 1024) <= 233472, "two CTAs per multiprocessor (228 KB, 1 KB reserved each)");

__device__ __forceinline__ uint2 lds64(uint32_t addr) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "r"(addr));
  return v;
}
__device__ __forceinline__ uint32_t clamp_bytes(int64_t avail, int most) {
  return static_cast<uint32_t>(avail <= 0 ? 0 : (avail < most ? avail : most));
}

struct Params {
  const uint8_t* packed;
  const float* absmax;  // non-nested
  const uint8_t* nc;    // nested codes (nested)
  const float* na;      // nested absmax (nested)
  float offset;
  int64_t nb;           // absmax blocks
  int64_t N, K;
  int k_tiles;          // K / 256
  int tiles_per_slice;  // k tiles of one grid.y slice
  int log2bs;
  int batch;
  int split;
  int tiles_per_cta;  // row tiles of one CTA (warps tiles_per_cta * split and up idle)
  bool nested;
};

// The absmax window of one row for one tile: 4 nested codes from b0 & ~3 (and the nested absmax of
// b0 / 256, which every block of the tile shares), or 4 floats from b0 & ~3.
__device__ __forceinline__ void issue_meta(const Params& p, const float* absmax, uint32_t meta, int lane,
                                           int64_t rowblk, int kt) {
  const int mr = lane & 15;
  const int64_t b0 = rowblk + ((static_cast<int64_t>(kt) * kTileWeights) >> p.log2bs);
  const int64_t w = b0 & ~int64_t{3};
  const uint32_t dst = meta + mr * kMetaStride;
  if (p.nested) {
    if (lane < 16) cp_async4(dst, p.nc + w, clamp_bytes(p.nb - w, 4));
    else cp_async4(dst + 4, p.na + (b0 >> 8), 4u);
  } else if (lane < 16) {
    cp_async16(dst, absmax + w, clamp_bytes(4 * (p.nb - w), 16));
  }
}

// What a CTA computes: one weight's rows (kDense), or MoE decode's grouped launches: the gate and up
// rows of one routed expert with SiLU (kGlu), or the down rows of a token's k routed experts and their
// routing-weighted sum (kSum).
enum Mode : int { kDense = 0, kGlu = 1, kSum = 2 };

// The grouped launches' per-CTA facts (unused by kDense).
struct GroupCta {
  int64_t gate_rows;   // kGlu: I, the expert's gate rows (its up rows follow)
  int k;               // kSum: routed experts per token (k warps of a row tile, each its own expert)
  bool known;          // kGlu: the group's expert id is one of the layer's (else NaN rows)
  const int64_t* ids;   // kSum: the launch's expert ids, the token's k from `first`
  int64_t first;        // kSum: t * k for token t
  int64_t experts;      // kSum: the layer's experts
  const void* weights;  // kSum: the launch's routing weights (DType w_dtype), the token's k from `first`
  int w_dtype;
};

// One weight ("segment") of a launch: its Params, tables and output. Several weights that read the same
// x (q/k/v, gate/up) run in one launch: their CTAs follow one another along grid.x.
struct Segment {
  Params p;
  const float* map8;       // [256] (nested)
  const float* quant_map;  // [16]
  void* y;                 // [B, N] in x's dtype
  float* scratch;          // this weight's [ks, B, N] K-slice partial sums (several K slices), else null
};

constexpr int kMaxSegments = kGemvMaxWeights;  // weights of one launch (qm_cuda.h)

struct Segments {
  Segment seg[kMaxSegments];
  int first_cta[kMaxSegments];  // first grid.x CTA of each segment (first_cta[0] == 0)
  int count;                    // segments in use, 1..kMaxSegments
};

// Warp w's parked partial sums (its C fragments, 32 lanes x 4 floats) after the k loop.
__device__ __forceinline__ const float* warp_part(const unsigned char* smem, int w) {
  return reinterpret_cast<const float*>(smem + kWarpOff + w * kWarpBytes);
}

// The work of one CTA: row tiles cta * tiles_per_cta .. of p's weight, K slice `slice`. Inlined
// into the kernel once per segment slot, so each copy reads its segment's fields at fixed parameter
// offsets, exactly as a one-weight launch does.
//
// kGlu / kSum (MoE decode, batch 1 per group, one K slice): `packed` / `absmax` are this warp's expert's
// region and x its activation row; kGlu's row tiles come in pairs (gate tile, then the up tile of the
// same rows, split warps each), kSum's row tiles take k * split warps (expert j = warp / split % k).
template <typename T, int M = kDense>
__device__ __forceinline__ void stream_cta(const T* __restrict__ x,              // [B, K]
                                           const Params& p,
                                           const float* __restrict__ map8,       // [256] (nested)
                                           const float* __restrict__ quant_map,  // [16]
                                           T* __restrict__ y,                    // [B, N] (one K slice)
                                           float* __restrict__ scratch,          // [ks, B, N] or null
                                           int64_t cta, int slice, const uint8_t* __restrict__ packed,
                                           const float* __restrict__ absmax, const GroupCta& job = GroupCta{}) {
  extern __shared__ __align__(16) unsigned char smem[];
  uint32_t* s_grid = reinterpret_cast<uint32_t*>(smem);
  float* s_map8 = reinterpret_cast<float*>(smem + kMap8Off);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  unsigned char* wbase = smem + kWarpOff + warp * kWarpBytes;  // this warp's absmax windows
  const uint32_t s_base = smem_addr(smem);
  const uint32_t s_meta = smem_addr(wbase);
  float* s_am = reinterpret_cast<float*>(wbase + kStages * kMetaBytes);
  const uint32_t s_rows = s_base + (warp * kStages * 16) * kGridRowBytes + kGridRowBytes / 2;  // stage 0, row 0

  const int split = p.split;
  const int tiles_per_cta = p.tiles_per_cta;
  const int per_tile = M == kSum ? split * job.k : split;  // warps of one row tile
  const int rt = warp / per_tile, sp = warp % split;
  int64_t row0 = (cta * tiles_per_cta + rt) * 16;
  bool live = row0 < p.N;
  if constexpr (M == kGlu) {  // row tile rt: pair rt / 2 of the CTA, its gate rows (rt even) or up rows
    const int64_t gate0 = (cta * (tiles_per_cta >> 1) + (rt >> 1)) * 16;
    row0 = gate0 + (rt & 1) * job.gate_rows;
    live = gate0 < job.gate_rows && job.known;
  } else if constexpr (M == kSum) {
    live = live && job.known;
  }
  const int kt0 = slice * p.tiles_per_slice;
  const int kt_end = min(p.k_tiles, kt0 + p.tiles_per_slice);
  const int span = kt_end - kt0;
  const int mine = (rt < tiles_per_cta && live && sp < span) ? (span - 1 - sp) / split + 1 : 0;
  const int64_t blocks_per_row = p.K >> p.log2bs;
  const int64_t half_k = p.K >> 1;

  // Copy side. Codes: lane l copies 16-byte piece j = l % 8 (segment j / 2, half j % 2) of rows
  // l / 8 + 4 i (i = 0..3) of each tile; rows past N read row N - 1.
  const uint8_t* src[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t r = min(row0 + (lane >> 3) + 4 * i, p.N - 1);
    src[i] = packed + r * half_k + (lane & 7) * 16;
  }
  const int crow = lane >> 3, piece = lane & 7;  // crow == row & 3 for all four rows
  const uint32_t code_dst = crow * kGridRowBytes + (((piece >> 1) ^ crow) * 32) + (piece & 1) * 16;
  const int64_t meta_rowblk = min(row0 + (lane & 15), p.N - 1) * blocks_per_row;

  auto issue = [&](int s, int kt) {
    const uint32_t st = s_rows + s * 16 * kGridRowBytes;
    const int64_t off = static_cast<int64_t>(kt) * kTileBytes;
#pragma unroll
    for (int i = 0; i < 4; ++i) cp_async16(st + code_dst + i * 4 * kGridRowBytes, src[i] + off);
    issue_meta(p, absmax, s_meta + s * kMetaBytes, lane, meta_rowblk, kt);
    cp_async_commit();
  };

  // Compute side: the lane's rows g and g + 8, k slot c, batch column g.
  const int g = lane >> 2, c = lane & 3;
  const uint32_t lane4 = static_cast<uint32_t>(lane) * 4;  // byte 0 of every table offset
  uint32_t seg[4];  // swizzled segment offsets of rows g and g + 8 (same row & 3)
#pragma unroll
  for (int s = 0; s < 4; ++s) seg[s] = g * kGridRowBytes + ((s ^ (g & 3)) * 32) + 8 * c;
  // Only the lanes of batch columns g < B load x; the others take zeros (their sums are never stored).
  // The predicate is what makes batch 1 cheap: every loaded byte comes back through the same L1 data
  // pipe as the table lookups (the kernel's bottleneck, ncu on the H200: 82% busy), and 8 lanes loading
  // x cost 4 wavefronts per 16-byte load where the 4 lanes of column 0 alone cost 1 (164 -> ~140
  // wavefronts per 16 x 256 tile).
  const bool x_lane = g < p.batch;
  const T* xg = x + static_cast<int64_t>(min(g, p.batch - 1)) * p.K + 16 * c;
  // Absmax decode side: lane l decodes row l % 16, segments 2 (l / 16) and 2 (l / 16) + 1.
  const int dr = lane & 15, dh = lane >> 4;
  const int fs0 = (2 * dh * 64) >> p.log2bs, fs1 = ((2 * dh + 1) * 64) >> p.log2bs;  // blocks in the tile

  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < mine) issue(s, kt0 + sp + s * split);
    else cp_async_commit();
  }

  // The table and map8, built while the first tiles are in flight (the stage rows and the table
  // entries share grid rows but never bytes).
  {
    // The pair table of gemv_mma.cu at byte * 256 + lane * 4; this thread writes bytes w + 8m
    // (w = warp), m = 0..31, high nibble (first element, low half) m / 2, low nibble w + 8 (m % 2).
    uint32_t v[32];
    pair_table_values<T>(quant_map, warp, v);
#pragma unroll
    for (int m = 0; m < 32; ++m) s_grid[(warp + 8 * m) * (kGridRowBytes / 4) + lane] = v[m];
  }
  static_assert(kThreads == 256, "one map8 entry per thread");
  if (p.nested) s_map8[threadIdx.x] = __ldg(map8 + threadIdx.x);
  __syncthreads();

  for (int it = 0; it < mine; ++it) {
    const int kt = kt0 + sp + it * split;
    // Activation fragments of the tile's 4 segments, requested before waiting for the weights.
    uint4 xb[4][2];
#pragma unroll
    for (int s = 0; s < 4; ++s)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        xb[s][h] = x_lane ? __ldg(reinterpret_cast<const uint4*>(xg + kt * kTileWeights + s * 64 + 8 * h))
                          : make_uint4(0u, 0u, 0u, 0u);
    const int ahead = it + kStages - 1;
    if (ahead < mine) issue(ahead % kStages, kt0 + sp + ahead * split);
    else cp_async_commit();
    cp_async_wait<kStages - 1>();
    __syncwarp();

    const uint32_t codes = s_rows + (it % kStages) * 16 * kGridRowBytes;
    {
      const unsigned char* m = wbase + (it % kStages) * kMetaBytes + dr * kMetaStride;
      const int64_t b0 = meta_rowblk + ((static_cast<int64_t>(kt) * kTileWeights) >> p.log2bs);  // row dr
      const int w0 = static_cast<int>(b0 & 3) + fs0, w1 = static_cast<int>(b0 & 3) + fs1;
      float am0, am1;
      if (p.nested) {
        const float na = reinterpret_cast<const float*>(m)[1];
        am0 = __fadd_rn(__fmul_rn(s_map8[m[w0]], na), p.offset);
        am1 = __fadd_rn(__fmul_rn(s_map8[m[w1]], na), p.offset);
      } else {
        am0 = reinterpret_cast<const float*>(m)[w0];
        am1 = reinterpret_cast<const float*>(m)[w1];
      }
      *reinterpret_cast<float2*>(s_am + dr * 4 + 2 * dh) = make_float2(am0, am1);
    }
    __syncwarp();
    const float4 amg = *reinterpret_cast<const float4*>(s_am + g * 4);
    const float4 amh = *reinterpret_cast<const float4*>(s_am + (g + 8) * 4);
    const float am[2][4] = {{amg.x, amg.y, amg.z, amg.w}, {amh.x, amh.y, amh.z, amh.w}};

#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const uint2 r0 = lds64(codes + seg[s]);
      const uint2 r1 = lds64(codes + seg[s] + 8 * kGridRowBytes);
      float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      // One permute and one shared load per byte: offset = lane * 4 (byte 0) | code byte b (byte 1).
#define QM_LUT(w, b) lds32(s_base + __byte_perm((w), lane4, 0x5504u + 16u * (b)))
      Mma<T>::run(part, QM_LUT(r0.x, 0), QM_LUT(r1.x, 0), QM_LUT(r0.x, 1), QM_LUT(r1.x, 1), xb[s][0].x, xb[s][0].y);
      Mma<T>::run(part, QM_LUT(r0.x, 2), QM_LUT(r1.x, 2), QM_LUT(r0.x, 3), QM_LUT(r1.x, 3), xb[s][0].z, xb[s][0].w);
      Mma<T>::run(part, QM_LUT(r0.y, 0), QM_LUT(r1.y, 0), QM_LUT(r0.y, 1), QM_LUT(r1.y, 1), xb[s][1].x, xb[s][1].y);
      Mma<T>::run(part, QM_LUT(r0.y, 2), QM_LUT(r1.y, 2), QM_LUT(r0.y, 3), QM_LUT(r1.y, 3), xb[s][1].z, xb[s][1].w);
#undef QM_LUT
      acc[0] = __fmaf_rn(am[0][s], part[0], acc[0]);
      acc[1] = __fmaf_rn(am[0][s], part[1], acc[1]);
      acc[2] = __fmaf_rn(am[1][s], part[2], acc[2]);
      acc[3] = __fmaf_rn(am[1][s], part[3], acc[3]);
    }
    __syncwarp();  // every lane is done with this stage and the decoded absmax before they are refilled
  }
  cp_async_wait<0>();
  __syncwarp();

  // Partial sums of the split warps of each row tile (parked in each warp's first stage), added in
  // warp order; then to y, or to this K slice's plane of the scratch buffer.
  float* red = reinterpret_cast<float*>(wbase);  // the warp's (now idle) absmax windows
#pragma unroll
  for (int i = 0; i < 4; ++i) red[lane * 4 + i] = acc[i];
  __syncthreads();
  if constexpr (M == kDense) {
    for (int o = threadIdx.x; o < tiles_per_cta * 16 * 8; o += kThreads) {
      const int t = o >> 7, r = (o >> 3) & 15, n = o & 7;
      const int64_t row = (cta * tiles_per_cta + t) * 16 + r;
      if (n >= p.batch || row >= p.N) continue;
      const int srcpos = ((r & 7) * 4 + (n >> 1)) * 4 + (r >> 3) * 2 + (n & 1);  // C fragment position
      float s = 0.0f;
      for (int w = 0; w < split; ++w) s = __fadd_rn(s, warp_part(smem, t * split + w)[srcpos]);
      if (scratch != nullptr) scratch[(static_cast<int64_t>(slice) * p.batch + n) * p.N + row] = s;
      else y[n * p.N + row] = Elem<T>::from(s);
    }
  } else {
    // Batch column 0 of rows cta's row tiles: kGlu h = silu(gate) * up of pair t (tiles 2t, 2t + 1);
    // kSum y = sum over j of w_j * (row tile t's dot with expert j), in slot order, as the CUDA-core
    // kernels of gemv_grouped.cu do.
    const int tiles = M == kGlu ? tiles_per_cta >> 1 : tiles_per_cta;
    for (int o = threadIdx.x; o < tiles * 16; o += kThreads) {
      const int t = o >> 4, r = o & 15;
      const int64_t row = (cta * tiles + t) * 16 + r;
      const int srcpos = (r & 7) * 16 + (r >> 3) * 2;  // C fragment position of (r, column 0)
      if constexpr (M == kGlu) {
        if (row >= job.gate_rows) continue;
        float gate = 0.0f, up = 0.0f;
        for (int w = 0; w < split; ++w) {
          gate = __fadd_rn(gate, warp_part(smem, 2 * t * split + w)[srcpos]);
          up = __fadd_rn(up, warp_part(smem, (2 * t + 1) * split + w)[srcpos]);
        }
        y[row] = Elem<T>::from(job.known ? silu_mul(gate, up) : nan_f());
      } else {
        if (row >= p.N) continue;
        float acc = 0.0f;
        bool all = true;
        for (int j = 0; j < job.k; ++j) {
          float dot = 0.0f;
          for (int w = 0; w < split; ++w) dot = __fadd_rn(dot, warp_part(smem, (t * job.k + j) * split + w)[srcpos]);
          const int64_t e = __ldg(job.ids + job.first + j);
          all = all && e >= 0 && e < job.experts;
          acc = __fmaf_rn(load_weight(job.weights, job.w_dtype, job.first + j), dot, acc);
        }
        y[row] = Elem<T>::from(all ? acc : nan_f());
      }
    }
  }
}

// One weight per launch: the kernel parameters of the one-weight launch as they always were (with the
// same arguments in a Segments struct, ptxas rematerialized the row pointers in the k loop: 385 instead
// of 329 SASS instructions per iteration on sm_90).
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
k_gemv_stream(const T* __restrict__ x, Params p, const float* __restrict__ map8, const float* __restrict__ quant_map,
              T* __restrict__ y, float* __restrict__ scratch) {
  stream_cta(x, p, map8, quant_map, y, scratch, blockIdx.x, static_cast<int>(blockIdx.y), p.packed, p.absmax);
}

// Several weights per launch: the CTA's segment from the prefix CTA counts (uniform across the CTA, so
// the __syncthreads inside stay uniform), then the per-CTA code of that segment, inlined once per slot.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
k_gemv_stream_multi(const T* __restrict__ x, const Segments segs) {
  const int cta = static_cast<int>(blockIdx.x);
  int si = 0;
#pragma unroll
  for (int j = 1; j < kMaxSegments; ++j)
    if (j < segs.count && cta >= segs.first_cta[j]) si = j;
#pragma unroll
  for (int j = 0; j < kMaxSegments; ++j)
    if (j == si)
      stream_cta(x, segs.seg[j].p, segs.seg[j].map8, segs.seg[j].quant_map, static_cast<T*>(segs.seg[j].y),
                 segs.seg[j].scratch, cta - segs.first_cta[j], static_cast<int>(blockIdx.y), segs.seg[j].p.packed,
                 segs.seg[j].p.absmax);
}

// MoE decode, first projection with SiLU: CTA (blockIdx.x, group g = blockIdx.y) takes pairs of row
// tiles of expert ids[g] (gate rows 0..I-1, up rows I..2I-1 of its region) against x row g / x_share and
// writes h[g, rows] = silu(gate) * up. p: the region's Params (N = 2I, batch 1, one K slice).
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
k_grouped_glu_mma(const T* __restrict__ x, int64_t x_share, const int64_t* __restrict__ ids, int64_t experts,
                  int64_t packed_stride, int64_t absmax_stride, const Params p, const float* __restrict__ quant_map,
                  T* __restrict__ h, int64_t I) {
  const int64_t g = blockIdx.y;
  const int64_t e = __ldg(ids + g);
  GroupCta job{};
  job.gate_rows = I;
  job.known = e >= 0 && e < experts;
  const int64_t at = job.known ? e : 0;  // an unknown id reads nothing (its warps have no tiles)
  stream_cta<T, kGlu>(x + (g / x_share) * p.K, p, nullptr, quant_map, h + g * I, nullptr, blockIdx.x, 0,
                      p.packed + at * packed_stride, p.absmax + at * absmax_stride, job);
}

// MoE decode, second projection and routing sum: CTA (blockIdx.x, token t = blockIdx.y) takes row tiles
// of the k experts ids[t k ..]: warp (tile, j, s) streams expert j's rows against h row t k + j, and
// y[t, rows] = sum_j w[t k + j] * dot_j in slot order.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
k_grouped_sum_mma(const T* __restrict__ h, int k, const int64_t* __restrict__ ids, int64_t experts,
                  const void* __restrict__ weights, int w_dtype, int64_t packed_stride, int64_t absmax_stride,
                  const Params p, const float* __restrict__ quant_map, T* __restrict__ y) {
  const int64_t t = blockIdx.y;
  const int j = (static_cast<int>(threadIdx.x >> 5) / p.split) % k;
  const int64_t g = t * k + j;
  const int64_t e = __ldg(ids + g);
  GroupCta job{};
  job.k = k;
  job.known = e >= 0 && e < experts;
  job.ids = ids;
  job.first = t * k;
  job.experts = experts;
  job.weights = weights;
  job.w_dtype = w_dtype;
  const int64_t at = job.known ? e : 0;
  stream_cta<T, kSum>(h + g * p.K, p, nullptr, quant_map, y + t * p.N, nullptr, blockIdx.x, 0,
                      p.packed + at * packed_stride, p.absmax + at * absmax_stride, job);
}

// y = the slices' partial sums added in slice order (0, 1, ...), rounded once to T.
template <typename T>
__device__ __forceinline__ void sum_slices(const float* __restrict__ scratch, T* __restrict__ y, int ks,
                                           int64_t count, int64_t i) {
  float s = 0.0f;
  for (int j = 0; j < ks; ++j) s = __fadd_rn(s, scratch[j * count + i]);
  y[i] = Elem<T>::from(s);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
k_sum_slices(const float* __restrict__ scratch, T* __restrict__ y, int ks, int64_t count) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i < count) sum_slices(scratch, y, ks, count, i);
}

// The segments of a several-weights launch for k_sum_slices_multi: element i of the launch belongs to
// the last segment whose first element is <= i.
template <typename T>
struct SliceSums {
  const float* scratch[kMaxSegments];  // [ks, count]
  T* y[kMaxSegments];                  // [count]
  int64_t first[kMaxSegments];         // first element of each segment in the launch (first[0] == 0)
  int64_t count[kMaxSegments];         // B * N of each segment
  int n;                               // segments in use
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
k_sum_slices_multi(const SliceSums<T> a, int ks, int64_t total) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= total) return;
  const float* scratch = a.scratch[0];
  T* y = a.y[0];
  int64_t first = 0, count = a.count[0];
#pragma unroll
  for (int j = 1; j < kMaxSegments; ++j)
    if (j < a.n && i >= a.first[j]) scratch = a.scratch[j], y = a.y[j], first = a.first[j], count = a.count[j];
  sum_slices(scratch, y, ks, count, i - first);
}

int multiprocessors(int device) {
  static std::atomic<int> cached[64] = {};
  if (device < 0 || device >= 64) return 132;
  int v = cached[device].load();
  if (v == 0) {
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || v <= 0) v = 132;
    cached[device].store(v);
  }
  return v;
}

struct Plan {
  int split;  // warps per row tile
  int ks;     // K slices across CTAs
  int tiles;  // row tiles per CTA (<= 8 / split)
};

// About two CTAs (16 warps) per multiprocessor: the intra-CTA split first (while every warp keeps at
// least four k tiles), the row tiles per CTA, then K slices across CTAs while there are fewer CTAs than
// two per multiprocessor and every warp keeps two k tiles per slice. Variants 12..15 force the split
// (8 / split row tiles per CTA, one slice), 16..18 force 2, 4 or 8 slices.
Plan plan(int device, int64_t N, int64_t K, int variant) {
  const int64_t row_tiles = (N + 15) / 16, k_tiles = K / kTileWeights;
  const int64_t slots = 2 * static_cast<int64_t>(multiprocessors(device));
  const int64_t sms = slots / 2;
  Plan pl{1, 1, kWarps};
  if (variant >= 12 && variant <= 15) {
    pl.split = 1 << (variant - 12);
    pl.tiles = kWarps / pl.split;
    return pl;
  }
  while (pl.split < kWarps && row_tiles * pl.split * 2 <= slots * kWarps && k_tiles >= 4 * pl.split) pl.split *= 2;
  // Row tiles per CTA: the fewest row tiles on the busiest multiprocessor (CTAs spread evenly, all
  // resident at once), ties to more per CTA. 28672 rows at split 1 on 132 SMs: 7 (256 CTAs, 14 row
  // tiles on the busiest SM) rather than 8 (224 CTAs, 16 on 92 SMs and 8 on 40). Split warps keep every
  // warp of a CTA busy: the q/k/v launches (6144 x 4096, 5120 x 2048 rows together) at split 4 took one
  // row tile per CTA (half of its warps idle, 384 / 320 CTAs in two waves): 12.7 / 9.1 us on an H100,
  // two row tiles per CTA (one wave) 11.1 / 7.7 us, same arithmetic (docs/benchmarks.md round 36).
  pl.tiles = kWarps / pl.split;
  int64_t best = -1;
  const int fewest = pl.split == 1 ? (kWarps + 1) / 2 : kWarps / pl.split;
  for (int t = kWarps / pl.split; t >= fewest; --t) {
    const int64_t busiest = ((row_tiles + t - 1) / t + sms - 1) / sms * t;
    if (best < 0 || busiest < best) best = busiest, pl.tiles = t;
  }
  const int64_t ctas = (row_tiles + pl.tiles - 1) / pl.tiles;
  if (variant >= 16 && variant <= 18) {
    pl.ks = 1 << (variant - 15);
  } else {
    while (pl.ks < 8 && ctas * pl.ks * 2 <= slots && k_tiles >= 2 * pl.split * pl.ks * 2) pl.ks *= 2;
  }
  if (pl.ks > k_tiles) pl.ks = static_cast<int>(k_tiles > 0 ? k_tiles : 1);
  return pl;
}

// Opt in to the kernel's shared memory once per device.
template <typename Kernel>
cudaError_t configure(Kernel kernel, std::atomic<uint64_t>& configured, int device) {
  const uint64_t bit = uint64_t{1} << (device & 63);
  if ((configured.load() & bit) != 0) return cudaSuccess;
  if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
      e != cudaSuccess)
    return e;
  configured.fetch_or(bit);
  return cudaSuccess;
}

// One launch for n (1..kMaxSegments) weights of the same x, K and blocksize: one plan for their rows
// together (the plan of one weight of sum N rows), each weight's row tiles in CTAs of their own after
// the previous weight's, its K-slice partial sums in its own plane of scratch (at batch * ks * the rows
// before it). n == 1 is the one-weight launch, with its own kernel entry (k_gemv_stream).
template <typename T>
cudaError_t launch(const GemvMmaArgs* a, int n, int device, int variant, float* scratch) {
  static std::atomic<uint64_t> configured_one{0}, configured_multi{0};
  if (cudaError_t e = n == 1 ? configure(k_gemv_stream<T>, configured_one, device)
                             : configure(k_gemv_stream_multi<T>, configured_multi, device);
      e != cudaSuccess)
    return e;
  int64_t rows = 0;
  for (int i = 0; i < n; ++i) rows += a[i].N;
  const int64_t K = a[0].K;
  const int batch = a[0].batch;
  Plan pl = plan(device, rows, K, variant);
  if (scratch == nullptr) pl.ks = 1;  // no buffer for partial sums: one slice
  const int k_tiles = static_cast<int>(K / kTileWeights);
  const int tps = (k_tiles + pl.ks - 1) / pl.ks;
  const int ks = (k_tiles + tps - 1) / tps;  // slices that hold at least one tile
  Segments segs{};
  SliceSums<T> sums{};
  int64_t ctas = 0, done = 0;  // CTAs and rows of the segments before segment i
  for (int i = 0; i < n; ++i) {
    const GemvMmaArgs& s = a[i];
    float* plane = ks > 1 ? scratch + static_cast<int64_t>(ks) * batch * done : nullptr;
    segs.seg[i] = Segment{Params{s.packed, s.absmax, s.nc, s.na, s.offset, (s.N * K) >> s.log2bs, s.N, K, k_tiles,
                                 tps, s.log2bs, batch, pl.split, pl.tiles, s.nc != nullptr},
                          s.map8, s.qm, s.y, plane};
    segs.first_cta[i] = static_cast<int>(ctas);
    sums.scratch[i] = plane;
    sums.y[i] = static_cast<T*>(s.y);
    sums.first[i] = static_cast<int64_t>(batch) * done;
    sums.count[i] = static_cast<int64_t>(batch) * s.N;
    ctas += ((s.N + 15) / 16 + pl.tiles - 1) / pl.tiles;
    done += s.N;
  }
  segs.count = n;
  sums.n = n;
  const dim3 grid(static_cast<unsigned>(ctas), static_cast<unsigned>(ks));
  const T* x = static_cast<const T*>(a[0].x);
  const cudaStream_t st = a[0].st;
  if (n == 1) {
    const Segment& g = segs.seg[0];
    k_gemv_stream<T><<<grid, kThreads, kSmemBytes, st>>>(x, g.p, g.map8, g.quant_map, static_cast<T*>(g.y),
                                                         g.scratch);
  } else {
    k_gemv_stream_multi<T><<<grid, kThreads, kSmemBytes, st>>>(x, segs);
  }
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess || ks == 1) return e;
  const int64_t total = static_cast<int64_t>(batch) * rows;
  const unsigned blocks = static_cast<unsigned>((total + kThreads - 1) / kThreads);
  if (n == 1) k_sum_slices<T><<<blocks, kThreads, 0, st>>>(scratch, sums.y[0], ks, total);
  else k_sum_slices_multi<T><<<blocks, kThreads, 0, st>>>(sums, ks, total);
  return cudaGetLastError();
}


// A grouped launch's shape: `split` warps per k range, row tiles per CTA (kGlu: two per pair), CTAs per group.
struct GroupPlan {
  int split, tiles;
  int64_t ctas;
};

// The fewest modelled waves (two CTAs per multiprocessor) x k tiles per warp, ties to fewer CTAs. Every
// warp of a CTA is used: kGlu takes 8 / (2 split) pairs of row tiles, kSum 8 / (k split) row tiles.
// Qwen3-30B-A3B (I 768, K 2048, 8 groups): gate/up at split 2, 2 pairs per CTA, 192 CTAs of 4 k tiles a
// warp; down (N 2048, K 768, k 8): split 1, one row tile of 8 experts per CTA, 128 CTAs of 3 k tiles.
GroupPlan group_plan(int device, Mode mode, int64_t rows, int64_t K, int64_t groups, int k) {
  const int64_t row_tiles = (rows + 15) / 16, k_tiles = K / kTileWeights;
  const int64_t slots = 2 * static_cast<int64_t>(multiprocessors(device));
  GroupPlan best{1, mode == kGlu ? 2 : 1, row_tiles};
  int64_t best_cost = -1;
  for (int split = 1; split <= kWarps; split *= 2) {
    const int per_unit = mode == kGlu ? 2 * split : k * split;  // warps of a pair (kGlu) or of a row tile
    if (per_unit > kWarps) break;
    const int units = kWarps / per_unit;
    const int64_t ctas = (row_tiles + units - 1) / units;
    const int64_t cost = (ctas * groups + slots - 1) / slots * ((k_tiles + split - 1) / split);
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      best = GroupPlan{split, mode == kGlu ? 2 * units : units, ctas};
    }
  }
  return best;
}

Params group_params(const GroupedMmaArgs& a, int64_t N, const GroupPlan& pl) {
  const int k_tiles = static_cast<int>(a.K / kTileWeights);
  return Params{a.packed, a.absmax, nullptr, nullptr, 0.0f, (N * a.K) >> a.log2bs, N, a.K, k_tiles, k_tiles,
                a.log2bs, 1, pl.split, pl.tiles, false};
}

template <typename T>
cudaError_t launch_glu(const GroupedMmaArgs& a, int device) {
  static std::atomic<uint64_t> configured{0};
  if (cudaError_t e = configure(k_grouped_glu_mma<T>, configured, device); e != cudaSuccess) return e;
  const GroupPlan pl = group_plan(device, kGlu, a.rows, a.K, a.groups, 1);
  const Params p = group_params(a, 2 * a.rows, pl);
  k_grouped_glu_mma<T><<<dim3(static_cast<unsigned>(pl.ctas), static_cast<unsigned>(a.groups)), kThreads,
                         kSmemBytes, a.st>>>(static_cast<const T*>(a.x), a.x_share, a.ids, a.experts,
                                             a.packed_stride, a.absmax_stride, p, a.quant_map,
                                             static_cast<T*>(a.y), a.rows);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_sum(const GroupedMmaArgs& a, int device) {
  static std::atomic<uint64_t> configured{0};
  if (cudaError_t e = configure(k_grouped_sum_mma<T>, configured, device); e != cudaSuccess) return e;
  const GroupPlan pl = group_plan(device, kSum, a.rows, a.K, a.groups, a.k);
  const Params p = group_params(a, a.rows, pl);
  k_grouped_sum_mma<T><<<dim3(static_cast<unsigned>(pl.ctas), static_cast<unsigned>(a.groups)), kThreads,
                         kSmemBytes, a.st>>>(static_cast<const T*>(a.x), a.k, a.ids, a.experts, a.weights,
                                             a.w_dtype, a.packed_stride, a.absmax_stride, p, a.quant_map,
                                             static_cast<T*>(a.y));
  return cudaGetLastError();
}

}  // namespace

bool grouped_mma_supported(int device, int dtype, int64_t K, int blocksize, uintptr_t x, uintptr_t packed,
                           int64_t packed_stride, uintptr_t absmax, int64_t absmax_stride, int k) {
  return gemv_stream_supported(device, dtype, K, blocksize, x, packed, absmax, 0) && packed_stride % 16 == 0 &&
         absmax_stride % 4 == 0 && k >= 1 && k <= kWarps;
}

cudaError_t launch_grouped_glu_mma(const GroupedMmaArgs& a, int dtype, int device) {
  return dtype == kBF16 ? launch_glu<__nv_bfloat16>(a, device) : launch_glu<__half>(a, device);
}

cudaError_t launch_grouped_sum_mma(const GroupedMmaArgs& a, int dtype, int device) {
  return dtype == kBF16 ? launch_sum<__nv_bfloat16>(a, device) : launch_sum<__half>(a, device);
}

bool gemv_stream_supported(int device, int dtype, int64_t K, int blocksize, uintptr_t x, uintptr_t packed,
                           uintptr_t absmax, uintptr_t ncodes) {
  return (dtype == kF16 || dtype == kBF16) && blocksize >= 64 && K % kTileWeights == 0 && K % blocksize == 0 &&
         K > 0 && K < (int64_t{1} << 30) && aligned16(x) && aligned16(packed) && aligned16(absmax) &&
         aligned16(ncodes) && smem_opt_in_fits(device, kSmemBytes);
}

int64_t gemv_stream_scratch(int device, int batch, int64_t N, int64_t K, int variant) {
  if (N <= 0 || K < kTileWeights) return 0;
  const Plan pl = plan(device, N, K, variant);
  return pl.ks > 1 ? static_cast<int64_t>(pl.ks) * batch * N : 0;
}

cudaError_t launch_gemv_stream(const GemvMmaArgs& a, int dtype, int device, int variant, float* scratch) {
  return launch_gemv_stream_multi(&a, 1, dtype, device, variant, scratch);
}

cudaError_t launch_gemv_stream_multi(const GemvMmaArgs* a, int n, int dtype, int device, int variant,
                                     float* scratch) {
  if (n < 1 || n > kMaxSegments) return cudaErrorInvalidValue;
  return dtype == kBF16 ? launch<__nv_bfloat16>(a, n, device, variant, scratch)
                        : launch<__half>(a, n, device, variant, scratch);
}

}  // namespace cuda
}  // namespace qm
