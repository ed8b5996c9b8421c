#include "cpu_features.h"

#include "float_convert.h"  // QM_X86

#include <cstdlib>
#include <stdexcept>

namespace qm {

#if QM_X86
bool cpu_has_avx2() {
  // __builtin_cpu_supports also checks that the OS saves the YMM/ZMM state (XCR0).
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}

bool cpu_has_avx512() {
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512dq");
  return has;
}

bool cpu_has_avx512bf16() {
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return has;
}
#else
bool cpu_has_avx2() { return false; }
bool cpu_has_avx512() { return false; }
bool cpu_has_avx512bf16() { return false; }
#endif

namespace {

bool cpu_runs(Isa isa) {
  switch (isa) {
    case Isa::AVX2:
      return cpu_has_avx2();
    case Isa::AVX512:
      return cpu_has_avx512();
    case Isa::AVX512BF16:
      return cpu_has_avx512bf16();
    default:
      return true;
  }
}

}  // namespace

std::vector<Isa> supported_isas() {
  std::vector<Isa> isas{Isa::Scalar};
  if (cpu_has_avx2()) isas.push_back(Isa::AVX2);
  if (cpu_has_avx512()) isas.push_back(Isa::AVX512);
  if (cpu_has_avx512bf16()) isas.push_back(Isa::AVX512BF16);
  return isas;
}

Isa resolve_isa_full(Isa requested) {
  if (requested == Isa::Auto) {
    // QM_CPU_ISA forces the path every "auto" call takes (tests run the suite once per ISA); read per
    // call so a test harness may set it after import. Unset or empty: the best path this CPU runs.
    const char* forced = std::getenv("QM_CPU_ISA");
    if (forced == nullptr || *forced == '\0') return supported_isas().back();
    try {
      requested = parse_isa(forced);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(std::string("QM_CPU_ISA: ") + e.what());
    }
    if (requested == Isa::Auto) return supported_isas().back();
    if (!cpu_runs(requested)) {
      throw std::invalid_argument(std::string("QM_CPU_ISA=") + forced +
                                  ": this CPU does not support that path; unset QM_CPU_ISA or pick one of cpu_isas()");
    }
    return requested;
  }
  if (!cpu_runs(requested)) {
    throw std::invalid_argument(std::string("this CPU does not support the ") + isa_name(requested) +
                                " path; use isa='auto' or one of cpu_isas()");
  }
  return requested;
}

Isa resolve_isa(Isa requested) {
  const Isa isa = resolve_isa_full(requested);
  return isa == Isa::AVX512BF16 ? Isa::AVX512 : isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar:
      return "scalar";
    case Isa::AVX2:
      return "avx2";
    case Isa::AVX512:
      return "avx512";
    case Isa::AVX512BF16:
      return "avx512bf16";
    case Isa::Auto:
      return "auto";
  }
  return "?";
}

Isa parse_isa(const std::string& name) {
  if (name == "scalar") return Isa::Scalar;
  if (name == "avx2") return Isa::AVX2;
  if (name == "avx512") return Isa::AVX512;
  if (name == "avx512bf16") return Isa::AVX512BF16;
  if (name == "auto") return Isa::Auto;
  throw std::invalid_argument("unknown isa '" + name +
                              "': expected 'scalar', 'avx2', 'avx512', 'avx512bf16' or 'auto'");
}

DType parse_dtype(const std::string& name) {
  if (name == "float32") return DType::F32;
  if (name == "float16") return DType::F16;
  if (name == "bfloat16") return DType::BF16;
  throw std::invalid_argument("unsupported dtype '" + name + "': expected float32, float16 or bfloat16");
}

int64_t dtype_size(DType dtype) { return dtype == DType::F32 ? 4 : 2; }

}  // namespace qm
