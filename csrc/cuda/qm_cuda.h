// Host entry points of the CUDA backend. Plain C++: no CUDA or torch types cross this header.
//
// Every pointer is a device address passed as an integer (Python's tensor.data_ptr()), every stream a
// cudaStream_t passed as an integer (torch.cuda.current_stream().cuda_stream), and `device` the CUDA
// device index those pointers live on. Launches are asynchronous on `stream`.
//
// Return value: 0 on success, a negative qm::cuda::Status for a bad argument, or a positive
// cudaError_t from the launch. bindings_cuda.cpp turns these into messages that name the shapes.
#pragma once

#include <cstdint>
#include <string>

namespace qm {
namespace cuda {

enum Status : int {
  kOk = 0,
  kBadDtype = -1,      // dtype code not in DType
  kBadBlocksize = -2,  // blocksize not a power of two in [32, 4096]
  kBadQuantType = -3,  // quant type not NF4 (1) or FP4 (2)
  kBadSize = -4,       // negative or too large element count / shape
  kBadBatch = -5,      // GEMV batch outside 1..8
  kNoDevice = -6,      // no usable CUDA device / driver
};

// Input/output element types (codes shared with converter/kernels_cuda.py).
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
// Quantization types (values of formats.quant_types.QuantType).
enum QuantKind : int { kNF4 = 1, kFP4 = 2 };

constexpr int kNestedBlock = 256;   // nested absmax block (bnb: fixed)
constexpr int kOffsetChunk = 1024;  // chunk of the deterministic float64 offset sum

// Short text for a negative Status (positive codes go through cudaGetErrorString).
const char* status_text(int status);
// Text of a positive code (a cudaError_t).
std::string cuda_error_text(int code);

// Number of usable devices; 0 with `why` filled when the driver is missing or too old for this build.
int device_count(std::string* why);
// Name, compute capability, multiprocessors, memory and L2 size of one device.
int device_props(int device, std::string* name, int* major, int* minor, int* sms, int64_t* total_mem,
                 int* l2_bytes);

// 4-bit blockwise quantize of n elements. flag (int32[1], may be 0) gets a non-zero value if some
// element is NaN or +-Inf; the caller zeroes it first and checks it afterwards.
int quantize_4bit(int device, uintptr_t x, int dtype, int64_t n, int blocksize, int quant_type,
                  uintptr_t packed, uintptr_t absmax, uintptr_t flag, uintptr_t stream);

// Nested (double) quantization of nb absmax values. Scratch: chunk_sums float64[2 * ceil(nb/1024)].
// offset_out float32[1] receives the offset; codes uint8[nb]; nested_absmax float32[ceil(nb/256)];
// mids float32[255] are the midpoints of the dynamic-8 map (formats.codebooks.DYNAMIC8_MIDPOINTS).
int quantize_nested(int device, uintptr_t absmax, int64_t nb, uintptr_t mids, uintptr_t chunk_sums,
                    uintptr_t offset_out, uintptr_t codes, uintptr_t nested_absmax, uintptr_t stream);

// absmax[i] = map8[codes[i]] * nested_absmax[i / 256] + offset (separate multiply and add).
int dequantize_nested(int device, uintptr_t codes, int64_t nb, uintptr_t nested_absmax, float offset,
                      uintptr_t map8, uintptr_t absmax_out, uintptr_t stream);

// out[k] = cast(quant_map[q[k]] * absmax[k / blocksize]); with ncodes != 0 the absmax is decoded
// inline from (ncodes, nested_absmax, offset, map8) and `absmax` is ignored.
int dequantize_4bit(int device, uintptr_t packed, int64_t n, int blocksize, uintptr_t absmax,
                    uintptr_t ncodes, uintptr_t nested_absmax, float offset, uintptr_t map8,
                    uintptr_t quant_map, int out_dtype, uintptr_t out, uintptr_t stream);

// y[b, o] = sum_k x[b, k] * W[o, k] for b < batch (1..8), W the [N, K] 4-bit weight (flattened blocks),
// float32 accumulation, y in x's dtype. Absmax nested or not as in dequantize_4bit. variant 0 picks
// the kernel (fp16/bf16 x: tensor cores, gemv_mma.cu); 1..5 force a CUDA-core configuration (batch
// 1-2), 6..9 the tensor-core kernel with 1/2/4/8 warps per row tile (bench/bench_cuda.py), 10 the
// CUDA-core kernel, 11..18 the lean tensor-core "stream" kernel (gemv_stream.cuh: 11 auto, 12..15
// split 1/2/4/8, 16..18 2/4/8 K slices), 20 the gemv_mma.cu kernel with its own split. scratch: float32
// buffer of gemv_4bit_scratch elements (0 when that is 0) for the stream kernel's K slices.
int gemv_4bit(int device, uintptr_t x, int dtype, int batch, int64_t N, int64_t K, int blocksize,
              uintptr_t packed, uintptr_t absmax, uintptr_t ncodes, uintptr_t nested_absmax, float offset,
              uintptr_t map8, uintptr_t quant_map, uintptr_t y, uintptr_t stream, int variant = 0,
              uintptr_t scratch = 0);

// float32 elements of scratch gemv_4bit needs for these arguments and variant (0: none).
int64_t gemv_4bit_scratch(int device, int dtype, int batch, int64_t N, int64_t K, int blocksize, int variant);

// y_i = x @ W_i.T for count (1..4) weights that share x, K and blocksize, in one launch where the
// stream kernel takes them all (16-bit x, its layout conditions for every weight, variant 0 or
// 11..18); else one gemv_4bit launch per weight (without scratch). Arrays of count entries, each as
// the argument of the same name of gemv_4bit; y[i] is [batch, N[i]]. scratch: gemv_4bit_multi_scratch
// float32 elements.
int gemv_4bit_multi(int device, uintptr_t x, int dtype, int batch, int64_t K, int blocksize, int count,
                    const int64_t* N, const uintptr_t* packed, const uintptr_t* absmax, const uintptr_t* ncodes,
                    const uintptr_t* nested_absmax, const float* offset, const uintptr_t* map8,
                    const uintptr_t* quant_map, const uintptr_t* y, uintptr_t stream, int variant,
                    uintptr_t scratch);

// float32 elements of scratch gemv_4bit_multi needs (0: none); rows = the sum of the weights' N.
int64_t gemv_4bit_multi_scratch(int device, int dtype, int batch, int64_t rows, int64_t K, int blocksize,
                                int variant);

constexpr int kGemvMaxWeights = 4;  // weights of one gemv_4bit_multi launch

// LLM.int8 row-wise quantize of a [rows, cols] weight (csrc/cuda/int8.cu): codes int8[rows*cols],
// scb float32[rows]; table (float32[0x7c01], may be 0) replaces bnb's CPU scale by the fp16 bits of
// SCB (the CUDA __fdividef scale); flag as in quantize_4bit.
int quantize_int8(int device, uintptr_t x, int dtype, int64_t rows, int64_t cols, uintptr_t table,
                  uintptr_t codes, uintptr_t scb, uintptr_t flag, uintptr_t stream);

// out = cast((codes * scb[row]) * f32(1/127)) for a [rows, cols] int8 weight.
int dequantize_int8(int device, uintptr_t codes, uintptr_t scb, int64_t rows, int64_t cols, int out_dtype,
                    uintptr_t out, uintptr_t stream);

}  // namespace cuda
}  // namespace qm
