// Element dtypes and instruction-set paths of the CPU kernels, and run-time ISA detection.
//
// SIMD paths are compiled per function with __attribute__((target(...))) (no -march=native) and
// chosen at run time from cpuid, so one binary runs everywhere and every path can be called by tests.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace qm {

// Element type of an input or output buffer (values shared with the binding).
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// A kernel implementation. Scalar is the reference; every other path is byte-identical to it, except
// AVX512BF16 in the 4-bit GEMV with bfloat16 x (code values rounded to bfloat16, gemv_cpu.cpp), the one
// kernel with a path of its own there; every other kernel runs AVX512BF16 as AVX512 (resolve_isa).
enum class Isa : int { Scalar = 0, AVX2 = 1, AVX512 = 2, AVX512BF16 = 3, Auto = -1 };

// AVX2 path: AVX2 + FMA + F16C. AVX-512 path: F + BW + VL + DQ (plus the AVX2 set). AVX512BF16 path:
// the AVX-512 set plus AVX512_BF16 (vdpbf16ps: Intel Cooper Lake / Sapphire Rapids on, AMD Zen 4 on).
bool cpu_has_avx2();
bool cpu_has_avx512();
bool cpu_has_avx512bf16();

// The paths this CPU can run, best last, e.g. {Scalar, AVX2, AVX512, AVX512BF16}.
std::vector<Isa> supported_isas();

// Auto -> the path QM_CPU_ISA names (scalar/avx2/avx512/avx512bf16; one this CPU lacks throws) or,
// unset, the best supported path; a named path the CPU lacks throws std::invalid_argument. Kernels
// without an AVX512BF16 variant call resolve_isa, which returns AVX512 for it; the 4-bit GEMV calls
// resolve_isa_full, which keeps AVX512BF16.
Isa resolve_isa_full(Isa requested);
Isa resolve_isa(Isa requested);

const char* isa_name(Isa isa);
Isa parse_isa(const std::string& name);     // "scalar" | "avx2" | "avx512" | "avx512bf16" | "auto"
DType parse_dtype(const std::string& name);  // "float32" | "float16" | "bfloat16"
int64_t dtype_size(DType dtype);

}  // namespace qm
