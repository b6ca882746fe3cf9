// Element types of the kernel library and their float conversions.
//
// The kernels never see torch or CUDA's own half types at their interfaces: 16-bit floats
// travel as plain 16-bit storage structs (bf16_t, half_t). Math is always done in fp32;
// the conversions below are __host__ __device__ so the CPU kernels and the CUDA kernels
// convert identically (round-to-nearest-even).
#pragma once

#include <cstdint>
#include <cstring>

#include "common/macros.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace cm3rt {

enum class DType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kInt32 = 3,
  kInt64 = 4,
  kBool = 5,
  kUInt8 = 6,
  kFloat64 = 7,
  kInt8 = 8,
};

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
    case DType::kBool: return "bool";
    case DType::kUInt8: return "uint8";
    case DType::kFloat64: return "float64";
    case DType::kInt8: return "int8";
  }
  return "unknown";
}

inline int dtype_size(DType t) {
  switch (t) {
    case DType::kFloat32: case DType::kInt32: return 4;
    case DType::kFloat16: case DType::kBFloat16: return 2;
    case DType::kInt64: case DType::kFloat64: return 8;
    case DType::kBool: case DType::kUInt8: case DType::kInt8: return 1;
  }
  return 0;
}

// 16-bit storage types (same layout as __nv_bfloat16 / __half).
struct alignas(2) bf16_t { uint16_t bits; };
struct alignas(2) half_t { uint16_t bits; };

CM3RT_HD uint32_t float_bits(float f) {
#if CM3RT_ON_DEVICE
  return __float_as_uint(f);
#else
  uint32_t u; std::memcpy(&u, &f, 4); return u;
#endif
}
CM3RT_HD float bits_float(uint32_t u) {
#if CM3RT_ON_DEVICE
  return __uint_as_float(u);
#else
  float f; std::memcpy(&f, &u, 4); return f;
#endif
}

CM3RT_HD float to_float(float x) { return x; }
CM3RT_HD float to_float(bf16_t x) { return bits_float(uint32_t(x.bits) << 16); }

CM3RT_HD float to_float(half_t x) {
#if CM3RT_ON_DEVICE
  __half h; memcpy(&h, &x, 2); return __half2float(h);
#else
  // IEEE binary16 -> binary32, exact (normals, subnormals, inf, nan).
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t exp = (x.bits >> 10) & 0x1fu;
  uint32_t mant = x.bits & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    if (mant == 0) return bits_float(sign);
    // subnormal: value = mant * 2^-24
    float v = float(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
#endif
}

template <typename T> CM3RT_HD T from_float(float f);
template <> CM3RT_HD float from_float<float>(float f) { return f; }
template <> CM3RT_HD bf16_t from_float<bf16_t>(float f) {
  uint32_t u = float_bits(f);
  bf16_t r;
  if ((u & 0x7fffffffu) > 0x7f800000u) { r.bits = uint16_t((u >> 16) | 0x40u); return r; }  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  r.bits = uint16_t(u >> 16);
  return r;
}
template <> CM3RT_HD half_t from_float<half_t>(float f) {
  half_t r;
#if CM3RT_ON_DEVICE
  __half h = __float2half_rn(f); memcpy(&r, &h, 2);
#else
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) { r.bits = uint16_t(sign | 0x7e00u); return r; }           // NaN
  if (abs >= 0x477ff000u) { r.bits = uint16_t(sign | 0x7c00u); return r; }          // overflow -> inf
  if (abs < 0x38800000u) {                                                          // subnormal / zero
    // value / 2^-24, rounded to nearest even
    const float v = bits_float(abs) * 16777216.0f;
    uint32_t m = uint32_t(v);
    const float rem = v - float(m);
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
    r.bits = uint16_t(sign | m);
    return r;
  }
  uint32_t h = ((abs - 0x38000000u) >> 13);
  const uint32_t rest = abs & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  r.bits = uint16_t(sign | h);
#endif
  return r;
}

template <typename T> struct DTypeOf;
template <> struct DTypeOf<float> { static constexpr DType value = DType::kFloat32; };
template <> struct DTypeOf<half_t> { static constexpr DType value = DType::kFloat16; };
template <> struct DTypeOf<bf16_t> { static constexpr DType value = DType::kBFloat16; };

}  // namespace cm3rt
