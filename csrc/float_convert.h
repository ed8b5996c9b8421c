// Exact scalar conversions between float32 and float16 / bfloat16, and the target attributes of the
// SIMD paths. Shared by the quantize, dequantize and GEMV kernels.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu_features.h"

// x86 SIMD paths exist only on x86 (elsewhere the scalar paths run; -DQM_NO_X86_SIMD builds that
// configuration on x86 too, to test it).
#if (defined(__x86_64__) || defined(__i386__)) && !defined(QM_NO_X86_SIMD)
#define QM_X86 1
#else
#define QM_X86 0
#endif

// Per-function targets: no -march=native, the binary stays portable and run-time dispatch picks a path.
#define QM_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define QM_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define QM_TARGET_AVX512BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))

namespace qm {

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// bfloat16 -> float32 is exact: the bf16 bits are the top half of the f32.
inline float bf16_to_f32(uint16_t h) { return bits_f32(uint32_t{h} << 16); }

// float16 -> float32, exact for every input (subnormals, inf, NaN payload kept and quieted by nothing).
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp != 0) return bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return bits_f32(sign);  // +-0
  // Subnormal half: normalize into an f32 normal (all half subnormals are f32 normals).
  int e = 113;
  while ((mant & 0x400u) == 0) {
    mant <<= 1;
    --e;
  }
  return bits_f32(sign | (uint32_t(e) << 23) | ((mant & 0x3ffu) << 13));
}

// float32 -> bfloat16, round to nearest even; NaN stays NaN (quiet bit set), as formats.reference.
inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// float32 -> float16, round to nearest even (overflow -> inf, f16 subnormals rounded exactly), the
// same bits as F16C's vcvtps2ph with rounding immediate 0. The subnormal branch adds a magic
// constant in float32 and relies on IEEE round-to-nearest with denormals on (see ScopedDenormalsOn).
inline uint16_t f32_to_f16(float f) {
  uint32_t u = f32_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  uint32_t o;
  if (u >= 0x47800000u) {                                                   // >= 65536, inf or NaN
    o = u > 0x7f800000u ? (0x7e00u | ((u & 0x7fffffu) >> 13)) : 0x7c00u;  // NaN quieted, else inf
  } else if (u < 0x38800000u) {  // below 2^-14: f16 subnormal or zero
    const uint32_t magic = 126u << 23;  // 0.5: adding it rounds |f| to a multiple of 2^-24
    const float sum = bits_f32(u) + bits_f32(magic);
    o = f32_bits(sum) - magic;
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += (uint32_t(15 - 127) << 23) + 0xfffu + mant_odd;
    o = u >> 13;
  }
  return uint16_t(o | sign);
}

// Element i of a buffer of the given dtype, widened to float32 (exact).
template <DType DT>
inline float load_elem(const void* p, int64_t i) {
  if constexpr (DT == DType::F32) {
    return static_cast<const float*>(p)[i];
  } else if constexpr (DT == DType::F16) {
    return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  } else {
    return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
}

// Stores a float32 into element i of a buffer of the given dtype (round to nearest even).
template <DType DT>
inline void store_elem(void* p, int64_t i, float v) {
  if constexpr (DT == DType::F32) {
    static_cast<float*>(p)[i] = v;
  } else if constexpr (DT == DType::F16) {
    static_cast<uint16_t*>(p)[i] = f32_to_f16(v);
  } else {
    static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
  }
}

}  // namespace qm
