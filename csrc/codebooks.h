// The code tables of bitsandbytes' 4-bit and nested 8-bit quantization, as float32 hex literals.
//
// A C++ copy of formats/codebooks.py (the single source of truth; values written with float.hex so
// they are exact). tests/kernels/test_kernels_tables.py asserts C++ == Python == bitsandbytes bit for bit
// through _kernels.tables(). Do not edit one without the other.
#pragma once

#include <cstdint>

namespace qm {

// Numeric values shared with formats.quant_types.QuantType (part of the binding's ABI).
enum class QuantType : int { NF4 = 1, FP4 = 2 };

// NF4 values indexed by the 4-bit code (bnb get_4bit_type("nf4") == kernels.cu nf4_dequantization_lut).
alignas(64) inline constexpr float kNF4[16] = {
    -0x1p+0f, -0x1.647362p-1f, -0x1.0cd66p-1f, -0x1.94654p-2f,
    -0x1.23449ap-2f, -0x1.7a6a7ep-3f, -0x1.74f0e2p-4f, 0x0p+0f,
    0x1.45f5fep-4f, 0x1.4995c6p-3f, 0x1.f809bap-3f, 0x1.5a0674p-2f,
    0x1.c3497p-2f, 0x1.200f56p-1f, 0x1.722766p-1f, 0x1p+0f,
};

// The 15 NF4 decision thresholds: f32 midpoints of kNF4, bit-equal to bnb CUDA dQuantizeNF4's literals.
// code = number of thresholds strictly below s.
alignas(64) inline constexpr float kNF4Thresholds[15] = {
    -0x1.b239bp-1f, -0x1.38a4ep-1f, -0x1.d709p-2f, -0x1.5bd4ecp-2f,
    -0x1.e079d8p-3f, -0x1.1a7178p-3f, -0x1.74f0e2p-5f, 0x1.45f5fep-5f,
    0x1.ec90c4p-4f, 0x1.a0cfcp-3f, 0x1.2b05a8p-2f, 0x1.8ea7f2p-2f,
    0x1.00da08p-1f, 0x1.491b5ep-1f, 0x1.b913b4p-1f,
};

// FP4 values indexed by the code; bit 3 is the sign. Index 8 is +0.0 as bnb's Python table writes it.
alignas(64) inline constexpr float kFP4[16] = {
    0x0p+0f, 0x1.555556p-8f, 0x1.555556p-1f, 0x1p+0f,
    0x1.555556p-2f, 0x1p-1f, 0x1.555556p-3f, 0x1p-2f,
    0x0p+0f, -0x1.555556p-8f, -0x1.555556p-1f, -0x1p+0f,
    -0x1.555556p-2f, -0x1p-1f, -0x1.555556p-3f, -0x1p-2f,
};

// bnb CUDA dQuantizeFP4 thresholds on |s| (its float32 literals 0.00260417, 0.0859375, 0.20833333,
// 0.29166667, 0.4166667, 0.583333, 0.8333333; NOT exact midpoints).
alignas(32) inline constexpr float kFP4Thresholds[7] = {
    0x1.555572p-9f, 0x1.6p-4f, 0x1.aaaaaap-3f, 0x1.2aaaaap-2f,
    0x1.aaaaacp-2f, 0x1.2aaaap-1f, 0x1.aaaaaap-1f,
};
// Unsigned FP4 code for "k thresholds strictly below |s|" (bnb's decision tree flattened); bit 3 = sign.
alignas(32) inline constexpr int32_t kFP4TreeCodes[8] = {0, 1, 6, 7, 4, 5, 2, 3};
inline constexpr int32_t kFP4SignBit = 8;

inline constexpr uint8_t kNF4ZeroCode = 7;  // code of 0.0: odd-tail pad
inline constexpr uint8_t kFP4ZeroCode = 0;

// bnb's signed dynamic 8-bit map (create_dynamic_map(signed=True)), used for nested absmax.
alignas(64) inline constexpr float kDynamic8[256] = {
    -0x1.fc6666p-1f, -0x1.f53334p-1f, -0x1.eep-1f, -0x1.e6ccccp-1f,
    -0x1.df999ap-1f, -0x1.d86666p-1f, -0x1.d13334p-1f, -0x1.cap-1f,
    -0x1.c2ccccp-1f, -0x1.bb999ap-1f, -0x1.b46666p-1f, -0x1.ad3334p-1f,
    -0x1.a6p-1f, -0x1.9eccccp-1f, -0x1.97999ap-1f, -0x1.906666p-1f,
    -0x1.893334p-1f, -0x1.82p-1f, -0x1.7accccp-1f, -0x1.73999ap-1f,
    -0x1.6c6668p-1f, -0x1.653334p-1f, -0x1.5ep-1f, -0x1.56ccccp-1f,
    -0x1.4f999ap-1f, -0x1.486668p-1f, -0x1.413334p-1f, -0x1.3ap-1f,
    -0x1.32ccccp-1f, -0x1.2b999ap-1f, -0x1.246668p-1f, -0x1.1d3334p-1f,
    -0x1.16p-1f, -0x1.0eccccp-1f, -0x1.079998p-1f, -0x1.006666p-1f,
    -0x1.f26664p-2f, -0x1.e4p-2f, -0x1.d59998p-2f, -0x1.c73334p-2f,
    -0x1.b8ccccp-2f, -0x1.aa6666p-2f, -0x1.9cp-2f, -0x1.8d9998p-2f,
    -0x1.7f3334p-2f, -0x1.70ccccp-2f, -0x1.626666p-2f, -0x1.54p-2f,
    -0x1.459998p-2f, -0x1.373334p-2f, -0x1.28ccccp-2f, -0x1.1a6668p-2f,
    -0x1.0cp-2f, -0x1.fb3332p-3f, -0x1.de6666p-3f, -0x1.c1999ap-3f,
    -0x1.a4ccccp-3f, -0x1.88p-3f, -0x1.6b3334p-3f, -0x1.4e6666p-3f,
    -0x1.31999ap-3f, -0x1.14ccccp-3f, -0x1.fp-4f, -0x1.b66668p-4f,
    -0x1.93d70ap-4f, -0x1.8851eep-4f, -0x1.7ccccep-4f, -0x1.7147aep-4f,
    -0x1.65c29p-4f, -0x1.5a3d7p-4f, -0x1.4eb854p-4f, -0x1.433334p-4f,
    -0x1.37ae14p-4f, -0x1.2c28f6p-4f, -0x1.20a3d6p-4f, -0x1.151ebap-4f,
    -0x1.09999ap-4f, -0x1.fc28f6p-5f, -0x1.e51ebap-5f, -0x1.ce147ap-5f,
    -0x1.b70a3ep-5f, -0x1.ap-5f, -0x1.88f5c2p-5f, -0x1.71eb86p-5f,
    -0x1.5ae146p-5f, -0x1.43d70ap-5f, -0x1.2ccccep-5f, -0x1.15c29p-5f,
    -0x1.fd70a4p-6f, -0x1.cf5c2ap-6f, -0x1.a147aep-6f, -0x1.733334p-6f,
    -0x1.451ebap-6f, -0x1.170a3ep-6f, -0x1.d1eb86p-7f, -0x1.75c29p-7f,
    -0x1.3e76c8p-7f, -0x1.2c083p-7f, -0x1.19999ap-7f, -0x1.072b02p-7f,
    -0x1.e978d4p-8f, -0x1.c49ba6p-8f, -0x1.9fbe76p-8f, -0x1.7ae148p-8f,
    -0x1.56041ap-8f, -0x1.3126e8p-8f, -0x1.0c49bap-8f, -0x1.ced914p-9f,
    -0x1.851eb8p-9f, -0x1.3b645ap-9f, -0x1.e353f8p-10f, -0x1.4fdf3ap-10f,
    -0x1.eecbfep-11f, -0x1.b3d07cp-11f, -0x1.78d5p-11f, -0x1.3dd982p-11f,
    -0x1.02de02p-11f, -0x1.8fc506p-12f, -0x1.19ce0ap-12f, -0x1.47ae16p-13f,
    -0x1.743e96p-14f, -0x1.15df66p-14f, -0x1.6f0068p-15f, -0x1.64840cp-16f,
    -0x1.040bfep-17f, -0x1.b43528p-19f, -0x1.27476ep-21f, 0x0p+0f,
    0x1.27476ep-21f, 0x1.b43528p-19f, 0x1.040bfep-17f, 0x1.64840cp-16f,
    0x1.6f0068p-15f, 0x1.15df66p-14f, 0x1.743e96p-14f, 0x1.47ae16p-13f,
    0x1.19ce0ap-12f, 0x1.8fc506p-12f, 0x1.02de02p-11f, 0x1.3dd982p-11f,
    0x1.78d5p-11f, 0x1.b3d07cp-11f, 0x1.eecbfep-11f, 0x1.4fdf3ap-10f,
    0x1.e353f8p-10f, 0x1.3b645ap-9f, 0x1.851eb8p-9f, 0x1.ced914p-9f,
    0x1.0c49bap-8f, 0x1.3126e8p-8f, 0x1.56041ap-8f, 0x1.7ae148p-8f,
    0x1.9fbe76p-8f, 0x1.c49ba6p-8f, 0x1.e978d4p-8f, 0x1.072b02p-7f,
    0x1.19999ap-7f, 0x1.2c083p-7f, 0x1.3e76c8p-7f, 0x1.75c29p-7f,
    0x1.d1eb86p-7f, 0x1.170a3ep-6f, 0x1.451ebap-6f, 0x1.733334p-6f,
    0x1.a147aep-6f, 0x1.cf5c2ap-6f, 0x1.fd70a4p-6f, 0x1.15c29p-5f,
    0x1.2ccccep-5f, 0x1.43d70ap-5f, 0x1.5ae146p-5f, 0x1.71eb86p-5f,
    0x1.88f5c2p-5f, 0x1.ap-5f, 0x1.b70a3ep-5f, 0x1.ce147ap-5f,
    0x1.e51ebap-5f, 0x1.fc28f6p-5f, 0x1.09999ap-4f, 0x1.151ebap-4f,
    0x1.20a3d6p-4f, 0x1.2c28f6p-4f, 0x1.37ae14p-4f, 0x1.433334p-4f,
    0x1.4eb854p-4f, 0x1.5a3d7p-4f, 0x1.65c29p-4f, 0x1.7147aep-4f,
    0x1.7ccccep-4f, 0x1.8851eep-4f, 0x1.93d70ap-4f, 0x1.b66668p-4f,
    0x1.fp-4f, 0x1.14ccccp-3f, 0x1.31999ap-3f, 0x1.4e6666p-3f,
    0x1.6b3334p-3f, 0x1.88p-3f, 0x1.a4ccccp-3f, 0x1.c1999ap-3f,
    0x1.de6666p-3f, 0x1.fb3332p-3f, 0x1.0cp-2f, 0x1.1a6668p-2f,
    0x1.28ccccp-2f, 0x1.373334p-2f, 0x1.459998p-2f, 0x1.54p-2f,
    0x1.626666p-2f, 0x1.70ccccp-2f, 0x1.7f3334p-2f, 0x1.8d9998p-2f,
    0x1.9cp-2f, 0x1.aa6666p-2f, 0x1.b8ccccp-2f, 0x1.c73334p-2f,
    0x1.d59998p-2f, 0x1.e4p-2f, 0x1.f26664p-2f, 0x1.006666p-1f,
    0x1.079998p-1f, 0x1.0eccccp-1f, 0x1.16p-1f, 0x1.1d3334p-1f,
    0x1.246668p-1f, 0x1.2b999ap-1f, 0x1.32ccccp-1f, 0x1.3ap-1f,
    0x1.413334p-1f, 0x1.486668p-1f, 0x1.4f999ap-1f, 0x1.56ccccp-1f,
    0x1.5ep-1f, 0x1.653334p-1f, 0x1.6c6668p-1f, 0x1.73999ap-1f,
    0x1.7accccp-1f, 0x1.82p-1f, 0x1.893334p-1f, 0x1.906666p-1f,
    0x1.97999ap-1f, 0x1.9eccccp-1f, 0x1.a6p-1f, 0x1.ad3334p-1f,
    0x1.b46666p-1f, 0x1.bb999ap-1f, 0x1.c2ccccp-1f, 0x1.cap-1f,
    0x1.d13334p-1f, 0x1.d86666p-1f, 0x1.df999ap-1f, 0x1.e6ccccp-1f,
    0x1.eep-1f, 0x1.f53334p-1f, 0x1.fc6666p-1f, 0x1p+0f,
};

// Its 255 f32 midpoints: nested code = number of midpoints strictly below v.
alignas(64) inline constexpr float kDynamic8Midpoints[255] = {
    -0x1.f8ccccp-1f, -0x1.f1999ap-1f, -0x1.ea6666p-1f, -0x1.e33334p-1f,
    -0x1.dcp-1f, -0x1.d4ccccp-1f, -0x1.cd999ap-1f, -0x1.c66666p-1f,
    -0x1.bf3334p-1f, -0x1.b8p-1f, -0x1.b0ccccp-1f, -0x1.a9999ap-1f,
    -0x1.a26666p-1f, -0x1.9b3334p-1f, -0x1.94p-1f, -0x1.8cccccp-1f,
    -0x1.85999ap-1f, -0x1.7e6666p-1f, -0x1.773334p-1f, -0x1.7p-1f,
    -0x1.68cccep-1f, -0x1.61999ap-1f, -0x1.5a6666p-1f, -0x1.533334p-1f,
    -0x1.4cp-1f, -0x1.44cccep-1f, -0x1.3d999ap-1f, -0x1.366666p-1f,
    -0x1.2f3334p-1f, -0x1.28p-1f, -0x1.20cccep-1f, -0x1.19999ap-1f,
    -0x1.126666p-1f, -0x1.0b3332p-1f, -0x1.04p-1f, -0x1.f99998p-2f,
    -0x1.eb3332p-2f, -0x1.dcccccp-2f, -0x1.ce6666p-2f, -0x1.cp-2f,
    -0x1.b19998p-2f, -0x1.a33334p-2f, -0x1.94ccccp-2f, -0x1.866666p-2f,
    -0x1.78p-2f, -0x1.699998p-2f, -0x1.5b3334p-2f, -0x1.4cccccp-2f,
    -0x1.3e6666p-2f, -0x1.3p-2f, -0x1.21999ap-2f, -0x1.133334p-2f,
    -0x1.04ccccp-2f, -0x1.ecccccp-3f, -0x1.dp-3f, -0x1.b33334p-3f,
    -0x1.966666p-3f, -0x1.79999ap-3f, -0x1.5cccccp-3f, -0x1.4p-3f,
    -0x1.233334p-3f, -0x1.066666p-3f, -0x1.d33334p-4f, -0x1.a51eb8p-4f,
    -0x1.8e147cp-4f, -0x1.828f5ep-4f, -0x1.770a3ep-4f, -0x1.6b852p-4f,
    -0x1.6p-4f, -0x1.547ae2p-4f, -0x1.48f5c4p-4f, -0x1.3d70a4p-4f,
    -0x1.31eb84p-4f, -0x1.266666p-4f, -0x1.1ae148p-4f, -0x1.0f5c2ap-4f,
    -0x1.03d70ap-4f, -0x1.f0a3d8p-5f, -0x1.d9999ap-5f, -0x1.c28f5cp-5f,
    -0x1.ab852p-5f, -0x1.947aep-5f, -0x1.7d70a4p-5f, -0x1.666666p-5f,
    -0x1.4f5c28p-5f, -0x1.3851ecp-5f, -0x1.2147bp-5f, -0x1.0a3d7p-5f,
    -0x1.e66668p-6f, -0x1.b851ecp-6f, -0x1.8a3d7p-6f, -0x1.5c28f8p-6f,
    -0x1.2e147cp-6f, -0x1p-6f, -0x1.a3d70cp-7f, -0x1.5a1cacp-7f,
    -0x1.353f7cp-7f, -0x1.22d0e4p-7f, -0x1.10624ep-7f, -0x1.fbe76cp-8f,
    -0x1.d70a3cp-8f, -0x1.b22d0ep-8f, -0x1.8d4fep-8f, -0x1.6872bp-8f,
    -0x1.43958p-8f, -0x1.1eb85p-8f, -0x1.f3b644p-9f, -0x1.a9fbe6p-9f,
    -0x1.604188p-9f, -0x1.16872cp-9f, -0x1.999998p-10f, -0x1.23a29cp-10f,
    -0x1.d14e3cp-11f, -0x1.9652bep-11f, -0x1.5b574p-11f, -0x1.205bc2p-11f,
    -0x1.cac084p-12f, -0x1.54c988p-12f, -0x1.bda514p-13f, -0x1.00e6bp-13f,
    -0x1.450efep-14f, -0x1.cd5f9ap-15f, -0x1.10a138p-15f, -0x1.e68a0cp-17f,
    -0x1.711948p-18f, -0x1.fe0704p-20f, -0x1.27476ep-22f, 0x1.27476ep-22f,
    0x1.fe0704p-20f, 0x1.711948p-18f, 0x1.e68a0cp-17f, 0x1.10a138p-15f,
    0x1.cd5f9ap-15f, 0x1.450efep-14f, 0x1.00e6bp-13f, 0x1.bda514p-13f,
    0x1.54c988p-12f, 0x1.cac084p-12f, 0x1.205bc2p-11f, 0x1.5b574p-11f,
    0x1.9652bep-11f, 0x1.d14e3cp-11f, 0x1.23a29cp-10f, 0x1.999998p-10f,
    0x1.16872cp-9f, 0x1.604188p-9f, 0x1.a9fbe6p-9f, 0x1.f3b644p-9f,
    0x1.1eb85p-8f, 0x1.43958p-8f, 0x1.6872bp-8f, 0x1.8d4fep-8f,
    0x1.b22d0ep-8f, 0x1.d70a3cp-8f, 0x1.fbe76cp-8f, 0x1.10624ep-7f,
    0x1.22d0e4p-7f, 0x1.353f7cp-7f, 0x1.5a1cacp-7f, 0x1.a3d70cp-7f,
    0x1p-6f, 0x1.2e147cp-6f, 0x1.5c28f8p-6f, 0x1.8a3d7p-6f,
    0x1.b851ecp-6f, 0x1.e66668p-6f, 0x1.0a3d7p-5f, 0x1.2147bp-5f,
    0x1.3851ecp-5f, 0x1.4f5c28p-5f, 0x1.666666p-5f, 0x1.7d70a4p-5f,
    0x1.947aep-5f, 0x1.ab852p-5f, 0x1.c28f5cp-5f, 0x1.d9999ap-5f,
    0x1.f0a3d8p-5f, 0x1.03d70ap-4f, 0x1.0f5c2ap-4f, 0x1.1ae148p-4f,
    0x1.266666p-4f, 0x1.31eb84p-4f, 0x1.3d70a4p-4f, 0x1.48f5c4p-4f,
    0x1.547ae2p-4f, 0x1.6p-4f, 0x1.6b852p-4f, 0x1.770a3ep-4f,
    0x1.828f5ep-4f, 0x1.8e147cp-4f, 0x1.a51eb8p-4f, 0x1.d33334p-4f,
    0x1.066666p-3f, 0x1.233334p-3f, 0x1.4p-3f, 0x1.5cccccp-3f,
    0x1.79999ap-3f, 0x1.966666p-3f, 0x1.b33334p-3f, 0x1.dp-3f,
    0x1.ecccccp-3f, 0x1.04ccccp-2f, 0x1.133334p-2f, 0x1.21999ap-2f,
    0x1.3p-2f, 0x1.3e6666p-2f, 0x1.4cccccp-2f, 0x1.5b3334p-2f,
    0x1.699998p-2f, 0x1.78p-2f, 0x1.866666p-2f, 0x1.94ccccp-2f,
    0x1.a33334p-2f, 0x1.b19998p-2f, 0x1.cp-2f, 0x1.ce6666p-2f,
    0x1.dcccccp-2f, 0x1.eb3332p-2f, 0x1.f99998p-2f, 0x1.04p-1f,
    0x1.0b3332p-1f, 0x1.126666p-1f, 0x1.19999ap-1f, 0x1.20cccep-1f,
    0x1.28p-1f, 0x1.2f3334p-1f, 0x1.366666p-1f, 0x1.3d999ap-1f,
    0x1.44cccep-1f, 0x1.4cp-1f, 0x1.533334p-1f, 0x1.5a6666p-1f,
    0x1.61999ap-1f, 0x1.68cccep-1f, 0x1.7p-1f, 0x1.773334p-1f,
    0x1.7e6666p-1f, 0x1.85999ap-1f, 0x1.8cccccp-1f, 0x1.94p-1f,
    0x1.9b3334p-1f, 0x1.a26666p-1f, 0x1.a9999ap-1f, 0x1.b0ccccp-1f,
    0x1.b8p-1f, 0x1.bf3334p-1f, 0x1.c66666p-1f, 0x1.cd999ap-1f,
    0x1.d4ccccp-1f, 0x1.dcp-1f, 0x1.e33334p-1f, 0x1.ea6666p-1f,
    0x1.f1999ap-1f, 0x1.f8ccccp-1f, 0x1.fe3334p-1f,
};

// The reciprocal is taken of max(absmax, kTiny): an all-zero block scales to 0.0, never NaN.
inline constexpr float kTiny = 0x1.b38fb8p-127f;  // float32(1e-38)

inline constexpr int64_t kNestedBlocksize = 256;  // fixed by bnb's matmul_4bit
inline constexpr int64_t kOffsetChunk = 1024;     // chunk of the deterministic float64 offset sum

}  // namespace qm
