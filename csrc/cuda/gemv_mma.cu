// Tensor-core fused 4-bit GEMV / small-batch GEMM for fp16 and bf16 activations:
// y[b, o] = sum_k x[b, k] * W[o, k] for b < B (1..8), on mma.sync m16n8k16 (16 weight rows x 8 batch
// columns x 16 k per instruction, float32 accumulators).
//
// Why tensor cores: the CUDA-core kernel (gemv.cu) spends ~6 integer and shared-memory instructions per
// weight (nibble extraction, table read, FMA) and is issue-bound at ~60% of the memory floor. Here a
// weight costs half a byte extract, half an address computation and half a table read; the mma does
// the products, and the batch columns come for free.
//
// Decode: a 256-entry table maps a packed byte (two codes) to the pair of 16-bit code values the A
// fragment wants (the first element, the high nibble, in the low half). It is replicated once per
// lane ([byte][lane], 32 KB), so 32 lanes reading 32 different bytes never share a bank. Code values
// are rounded to the activation type (as dequantize-to-16-bit + cuBLAS rounds the weight); the absmax
// multiplies the mma's float32 partial sums, once per block.
//
// k order: the 16 k of one mma must share an absmax block, so the 4 lanes of a row group (lane = 4g + c)
// take word c (bytes 4c..4c+3) of the same 16-byte chunk (32 weights): byte 4c+i of the chunk holds
// weights 8c+2i and 8c+2i+1 and feeds k pair i of the lane's fragment; the activation fragment is read
// in the same order (x[8c .. 8c+7] of the chunk, one 16-byte load), so the permutation cancels.
//
// Data movement: every warp streams tiles of 16 rows x 256 weights (2 KB of codes plus the tile's
// absmax inputs: a 12-float window of absmax, or a 32-byte window of nested codes and two nested absmax)
// through a 3-stage cp.async ring of its own in shared memory: 6 copy instructions per lane per tile.
// `split` warps share a row tile and take every split-th k tile; their partial sums meet in shared
// memory in a fixed order. Rows hold whole blocks (K % blocksize == 0, as bitsandbytes' GEMV requires),
// so a row's blocks are row * K / blocksize + a tile-relative index.
#include "common.cuh"
#include "gemv_mma.cuh"

#include <atomic>

#include "mma_common.cuh"

namespace qm {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kStages = 3;
constexpr int kTileChunks = 8;                     // 32-weight chunks per k tile
constexpr int kTileWeights = kTileChunks * 32;     // 256
constexpr int kRowStride = kTileChunks * 16 + 16;  // bytes; +16 puts consecutive rows 4 banks apart
constexpr int kStageCodeBytes = 16 * kRowStride;
// Per row: 12 float absmax from b0 & ~3, or 32 bytes of nested codes from b0 & ~15 + 2 nested absmax.
// 48 bytes = 12 banks apart: the 8 rows a warp reads at once land in 8 different banks.
constexpr int kMetaBytes = 48;
constexpr int kStageBytes = kStageCodeBytes + 16 * kMetaBytes;
constexpr int kLutBytes = 256 * 32 * 4;
constexpr int kMap8Bytes = 256 * 4;
constexpr int kSmemBytes = kLutBytes + kMap8Bytes + kWarps * kStages * kStageBytes;
static_assert(kStageBytes >= 32 * 4 * 4, "a warp's partial sums fit in its first stage");
static_assert(2 * (kSmemBytes + 1024) <= 233472, "two CTAs per multiprocessor (228 KB, 1 KB reserved each)");

__device__ __forceinline__ uint32_t clamp16(int64_t avail) {
  return static_cast<uint32_t>(avail <= 0 ? 0 : (avail < 16 ? avail : 16));
}

struct Params {
  const uint8_t* packed;
  const float* absmax;
  const uint8_t* nc;
  const float* na;
  int64_t nb, nna;  // absmax blocks, nested absmax blocks
  int64_t N, K;
  int chunks;  // K / 32
  int log2bs;
  bool nested;
};

// Per-lane constants of the copy side. Codes: lane l copies 16-byte segment l % 8 of rows l / 8 + 4 i
// (i = 0..3). Absmax inputs: lane l copies, for row l % 16, window l / 16 (and l / 16 + 2) of 16 bytes.
struct Copier {
  const uint8_t* src;  // codes of row l / 8, segment l % 8, tile 0
  uint32_t dst;        // that segment's offset within a stage
  uint32_t meta_dst;   // offset of row l % 16's absmax inputs within a stage, + 16 * (l / 16)
  int64_t rb;          // first block of row l % 16
  int code_row, meta_row, seg, half;
};

// Queue the copies of k tile kt of the warp's row tile into one stage, as one commit group.
__device__ __forceinline__ void issue_tile(const Params& p, const Copier& cp, uint32_t stage, int nrows, int kt) {
  const bool whole = (kt + 1) * kTileChunks <= p.chunks;
  const uint8_t* src = cp.src + static_cast<int64_t>(kt) * (kTileChunks * 16);
#pragma unroll
  for (int i = 0; i < 4; ++i)
    if (cp.code_row + 4 * i < nrows && (whole || kt * kTileChunks + cp.seg < p.chunks))
      cp_async16(stage + cp.dst + i * 4 * kRowStride, src + i * 2 * p.K);
  if (cp.meta_row < nrows) {
    const int64_t b0 = cp.rb + ((kt * kTileWeights) >> p.log2bs);  // the row's first block of the tile
    const int nblk = p.log2bs >= 8 ? 1 : kTileWeights >> p.log2bs;    // blocks in a whole tile
    const uint32_t dst = stage + kStageCodeBytes + cp.meta_dst;
    if (!p.nested) {  // floats from b0 & ~3, in windows of 4 (at most 3): those holding the tile's blocks
      const int need = static_cast<int>(b0 & 3) + nblk;
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const int win = cp.half + 2 * k;
        const int64_t w = (b0 & ~int64_t{3}) + 4 * win;
        if (win < 3 && 4 * win < need)
          cp_async16(dst + 32 * k, p.absmax + (w < p.nb ? w : 0), clamp16(4 * (p.nb - w)));
      }
    } else {  // codes from b0 & ~15 (one or two windows of 16), nested absmax b0 / 256 (and the next)
      const int64_t c0 = (b0 & ~int64_t{15}) + 16 * cp.half;
      if (16 * cp.half < static_cast<int>(b0 & 15) + nblk) cp_async16(dst, p.nc + (c0 < p.nb ? c0 : 0), clamp16(p.nb - c0));
      const int64_t q = (b0 >> 8) + cp.half;
      if (cp.half == 0 || static_cast<int>(b0 & 255) + nblk > 256)
        cp_async4(stage + kStageCodeBytes + cp.meta_dst - 16 * cp.half + 32 + 4 * cp.half,
                  p.na + (q < p.nna ? q : 0), q < p.nna ? 4u : 0u);
    }
  }
  cp_async_commit();
}

// Per-lane constants of the tile loop. The lane's rows are g and g + 8 of the row tile, its k slot c,
// its batch column g. qlow = the row's first block modulo 256 (its place in its nested block, and
// modulo 4 / 16 its place in the copied windows).
struct Lane {
  uint32_t lut;         // shared address of the table's copy for this lane
  const float* map8;    // shared copy (nested)
  float offset;
  bool nested;
  int log2bs;
  int g, c;
  int qlow[2];
};

// The two mmas of stage chunk j into part: 16 rows x 32 weights times the activation fragment xb.
template <typename T>
__device__ __forceinline__ void chunk_mma(const Lane& L, const uint32_t* codes, int j, const uint4& xb,
                                          float (&part)[4]) {
  const uint32_t w0 = codes[L.g * (kRowStride / 4) + j * 4 + L.c];
  const uint32_t w1 = codes[(L.g + 8) * (kRowStride / 4) + j * 4 + L.c];
  // One extract, one multiply-add and one shared load per byte: entry byte * 128 + lane * 4.
#define QM_LUT(w, b) lds32(L.lut + (__byte_perm((w), 0u, 0x4440u + (b)) << 7))
  Mma<T>::run(part, QM_LUT(w0, 0), QM_LUT(w1, 0), QM_LUT(w0, 1), QM_LUT(w1, 1), xb.x, xb.y);
  Mma<T>::run(part, QM_LUT(w0, 2), QM_LUT(w1, 2), QM_LUT(w0, 3), QM_LUT(w1, 3), xb.z, xb.w);
#undef QM_LUT
}

__device__ __forceinline__ void scale_into(float (&acc)[4], const float (&part)[4], float am0, float am1) {
  acc[0] = __fmaf_rn(am0, part[0], acc[0]);
  acc[1] = __fmaf_rn(am0, part[1], acc[1]);
  acc[2] = __fmaf_rn(am1, part[2], acc[2]);
  acc[3] = __fmaf_rn(am1, part[3], acc[3]);
}

// The absmax of row g + 8h for the f-th block of tile kt (f = 0..7), from the stage's windows.
__device__ __forceinline__ float tile_absmax(const Lane& L, const unsigned char* meta, int h, int kt, int f) {
  const unsigned char* m = meta + (L.g + 8 * h) * kMetaBytes;
  const int base = L.qlow[h] + ((kt * kTileWeights) >> L.log2bs);  // b0 modulo 256 (+ a multiple of 256)
  if (!L.nested) return reinterpret_cast<const float*>(m)[(base & 3) + f];
  const int code = m[(base & 15) + f];
  const float* na = reinterpret_cast<const float*>(m + 32);
  return __fadd_rn(__fmul_rn(L.map8[code], na[(base & 255) + f >= 256 ? 1 : 0]), L.offset);
}

// A whole tile with CPF chunks per block (1, 2, 4; 8 for blocks of 256 and more): straight-line
// code, each block summed in its own registers, so table reads and mmas of different blocks overlap.
template <typename T, int CPF>
__device__ __forceinline__ void full_tile(const Lane& L, const uint32_t* codes, const unsigned char* meta,
                                          const uint4 (&xb)[kTileChunks], int kt, float (&acc)[4]) {
  constexpr int NF = kTileChunks / CPF;
  float am[NF][2];
#pragma unroll
  for (int f = 0; f < NF; ++f)
#pragma unroll
    for (int h = 0; h < 2; ++h) am[f][h] = tile_absmax(L, meta, h, kt, f);
#pragma unroll
  for (int f = 0; f < NF; ++f) {
    float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int q = 0; q < CPF; ++q) chunk_mma<T>(L, codes, f * CPF + q, xb[f * CPF + q], part);
    scale_into(acc, part, am[f][0], am[f][1]);
  }
}

// The last, partial tile of a row (K % 256 != 0): one scale per chunk.
template <typename T>
__device__ __forceinline__ void last_tile(const Lane& L, const uint32_t* codes, const unsigned char* meta,
                                          const uint4 (&xb)[kTileChunks], int kt, int chunks, float (&acc)[4]) {
#pragma unroll
  for (int j = 0; j < kTileChunks; ++j) {
    if (kt * kTileChunks + j >= chunks) break;
    float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    chunk_mma<T>(L, codes, j, xb[j], part);
    const int f = (j * 32) >> L.log2bs;  // block of the chunk within the tile
    scale_into(acc, part, tile_absmax(L, meta, 0, kt, f), tile_absmax(L, meta, 1, kt, f));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
k_gemv_mma(const T* __restrict__ x,              // [B, K]
           Params p,
           float offset,                         // nested offset
           const float* __restrict__ map8,       // [256] (nested)
           const float* __restrict__ quant_map,  // [16]
           T* __restrict__ y,                    // [B, N]
           int batch, int split) {
  extern __shared__ __align__(16) unsigned char smem[];
  uint32_t* s_lut = reinterpret_cast<uint32_t*>(smem);
  float* s_map8 = reinterpret_cast<float*>(smem + kLutBytes);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  unsigned char* stages = smem + kLutBytes + kMap8Bytes + warp * kStages * kStageBytes;
  const uint32_t s_stages = smem_addr(stages);

  {
    // Entry i = 32 * byte + lane copy; this thread writes bytes w + 8m (w = warp), m = 0..31, whose high
    // nibble (first element, low half) is m / 2 and low nibble w + 8 (m % 2).
    uint32_t v[32];
    pair_table_values<T>(quant_map, warp, v);
#pragma unroll
    for (int m = 0; m < 32; ++m) s_lut[m * kThreads + threadIdx.x] = v[m];
  }
  static_assert(kThreads == 256, "one map8 entry per thread");
  if (p.nested) s_map8[threadIdx.x] = __ldg(map8 + threadIdx.x);
  __syncthreads();

  const int tiles_per_cta = kWarps / split;
  const int rt = warp / split, sp = warp % split;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * tiles_per_cta + rt) * 16;
  const int64_t left = p.N - row0;
  const int nrows = left <= 0 ? 0 : (left < 16 ? static_cast<int>(left) : 16);
  const int k_tiles = (p.chunks + kTileChunks - 1) / kTileChunks;
  const int mine = (nrows > 0 && sp < k_tiles) ? (k_tiles - 1 - sp) / split + 1 : 0;
  const int64_t blocks_per_row = p.K >> p.log2bs;

  Lane L;
  L.lut = smem_addr(s_lut) + lane * 4;
  L.map8 = s_map8;
  L.offset = offset;
  L.nested = p.nested;
  L.log2bs = p.log2bs;
  L.g = lane >> 2;
  L.c = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) L.qlow[h] = static_cast<int>(((row0 + L.g + 8 * h) * blocks_per_row) & 255);
  const int cpf = min(1 << (p.log2bs - 5), kTileChunks);  // chunks per block, capped at a tile

  Copier cp;
  cp.code_row = lane >> 3;
  cp.seg = lane & 7;
  cp.src = p.packed + (((row0 + cp.code_row) * p.K) >> 1) + cp.seg * 16;
  cp.dst = cp.code_row * kRowStride + cp.seg * 16;
  cp.meta_row = lane & 15;
  cp.half = lane >> 4;
  cp.meta_dst = cp.meta_row * kMetaBytes + 16 * cp.half;
  cp.rb = (row0 + cp.meta_row) * blocks_per_row;

  const uint4* xg = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(L.g) * p.K) + L.c;  // x[g][8c..]
  const bool has_x = L.g < batch;

  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < mine) issue_tile(p, cp, s_stages + s * kStageBytes, nrows, sp + s * split);
    else cp_async_commit();
  }
  for (int it = 0; it < mine; ++it) {
    const int kt = sp + it * split;
    // The activation fragments of this tile, requested before waiting for its weights.
    uint4 xb[kTileChunks];
    const uint4* xt = xg + kt * (kTileChunks * 4);
#pragma unroll
    for (int j = 0; j < kTileChunks; ++j)
      xb[j] = (has_x && kt * kTileChunks + j < p.chunks) ? __ldg(xt + 4 * j) : make_uint4(0, 0, 0, 0);
    const int ahead = it + kStages - 1;
    if (ahead < mine) issue_tile(p, cp, s_stages + (ahead % kStages) * kStageBytes, nrows, sp + ahead * split);
    else cp_async_commit();
    cp_async_wait<kStages - 1>();
    __syncwarp();

    const unsigned char* st = stages + (it % kStages) * kStageBytes;
    const uint32_t* codes = reinterpret_cast<const uint32_t*>(st);
    const unsigned char* meta = st + kStageCodeBytes;
    if ((kt + 1) * kTileChunks <= p.chunks) {
      switch (cpf) {
        case 8: full_tile<T, 8>(L, codes, meta, xb, kt, acc); break;
        case 4: full_tile<T, 4>(L, codes, meta, xb, kt, acc); break;
        case 2: full_tile<T, 2>(L, codes, meta, xb, kt, acc); break;
        default: full_tile<T, 1>(L, codes, meta, xb, kt, acc); break;
      }
    } else {
      last_tile<T>(L, codes, meta, xb, kt, p.chunks, acc);
    }
    __syncwarp();  // every lane is done with this stage before it is refilled
  }
  cp_async_wait<0>();
  __syncwarp();

  // Partial sums of the split warps of each row tile (parked in each warp's own first stage), added in
  // warp order.
  float* red = reinterpret_cast<float*>(stages);
#pragma unroll
  for (int i = 0; i < 4; ++i) red[lane * 4 + i] = acc[i];
  __syncthreads();
  for (int o = threadIdx.x; o < tiles_per_cta * 16 * 8; o += kThreads) {
    const int t = o >> 7, r = (o >> 3) & 15, n = o & 7;
    const int64_t row = (static_cast<int64_t>(blockIdx.x) * tiles_per_cta + t) * 16 + r;
    if (n >= batch || row >= p.N) continue;
    const int src = ((r & 7) * 4 + (n >> 1)) * 4 + (r >> 3) * 2 + (n & 1);  // C fragment position
    float s = 0.0f;
    for (int w = 0; w < split; ++w) {
      const float* part = reinterpret_cast<const float*>(smem + kLutBytes + kMap8Bytes +
                                                         (t * split + w) * kStages * kStageBytes);
      s = __fadd_rn(s, part[src]);
    }
    y[n * p.N + row] = Elem<T>::from(s);
  }
}

// The split that keeps the card busy: about 2048 warps (16 per multiprocessor) while each warp still
// streams at least two k tiles. Measured best on an H100 (bench_cuda.py variants 6..9): split 1 for
// 32768 x 8192, 2 for 14336 x 4096, 4 for 8192 x 8192, 8 for 4096 x 4096.
int pick_split(int64_t N, int64_t K) {
  const int64_t row_tiles = (N + 15) / 16, k_tiles = (K + kTileWeights - 1) / kTileWeights;
  int split = 1;
  while (split < kWarps && row_tiles * split * 2 <= 2048 && 2 * split * 2 <= k_tiles) split *= 2;
  return split;
}

template <typename T>
cudaError_t launch(const GemvMmaArgs& a, int split) {
  // The dynamic shared memory above 48 KB is opted into once per device.
  static std::atomic<uint64_t> configured{0};
  int dev = 0;
  if (cudaError_t e = cudaGetDevice(&dev); e != cudaSuccess) return e;
  const uint64_t bit = uint64_t{1} << (dev & 63);
  if ((configured.load() & bit) == 0) {
    if (cudaError_t e = cudaFuncSetAttribute(k_gemv_mma<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
        e != cudaSuccess)
      return e;
    configured.fetch_or(bit);
  }
  if (split <= 0) split = pick_split(a.N, a.K);
  const int64_t per_cta = kWarps / split;
  const int64_t ctas = ((a.N + 15) / 16 + per_cta - 1) / per_cta;
  const int64_t nb = (a.N * a.K) >> a.log2bs;
  const Params p{a.packed, a.absmax, a.nc, a.na, nb, (nb + 255) / 256, a.N, a.K, static_cast<int>(a.K / 32),
                 a.log2bs, a.nc != nullptr};
  k_gemv_mma<T><<<static_cast<unsigned>(ctas), kThreads, kSmemBytes, a.st>>>(
      static_cast<const T*>(a.x), p, a.offset, a.map8, a.qm, static_cast<T*>(a.y), a.batch, split);
  return cudaGetLastError();
}

}  // namespace

bool gemv_mma_supported(int device, int dtype, int64_t K, int blocksize, uintptr_t x, uintptr_t packed,
                        uintptr_t absmax, uintptr_t ncodes) {
  return (dtype == kF16 || dtype == kBF16) && K % blocksize == 0 && K < (int64_t{1} << 30) && aligned16(x) &&
         aligned16(packed) && aligned16(absmax) && aligned16(ncodes) && smem_opt_in_fits(device, kSmemBytes);
}

cudaError_t launch_gemv_mma(const GemvMmaArgs& a, int dtype, int split) {
  return dtype == kBF16 ? launch<__nv_bfloat16>(a, split) : launch<__half>(a, split);
}

}  // namespace cuda
}  // namespace qm
