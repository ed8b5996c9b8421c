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

// A kernel implementation. Scalar is the reference; every other path is byte-identical to it.
enum class Isa : int { Scalar = 0, AVX2 = 1, AVX512 = 2, Auto = -1 };

// AVX2 path: AVX2 + FMA + F16C. AVX-512 path: F + BW + VL + DQ (plus the AVX2 set).
bool cpu_has_avx2();
bool cpu_has_avx512();

// The paths this CPU can run, best last, e.g. {Scalar, AVX2, AVX512}.
std::vector<Isa> supported_isas();

// Auto -> the path QM_CPU_ISA names (scalar/avx2/avx512; one this CPU lacks throws) or, unset, the best
// supported path; a named path the CPU lacks throws std::invalid_argument.
Isa resolve_isa(Isa requested);

const char* isa_name(Isa isa);
Isa parse_isa(const std::string& name);     // "scalar" | "avx2" | "avx512" | "auto"
DType parse_dtype(const std::string& name);  // "float32" | "float16" | "bfloat16"
int64_t dtype_size(DType dtype);

}  // namespace qm
