// Portable 8-lane float vectors for the CPU kernels (GCC/Clang vector extensions: AVX2 with
// -march=native on x86-64, NEON pairs on arm64, SSE pairs on a portable build).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/dtype.h"

namespace cm3rt::cpu {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8f load8(const float* p) { v8f v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }
inline v8f splat8(float x) { return v8f{x, x, x, x, x, x, x, x}; }

inline float hsum8(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}
inline float hmax8(v8f v) {
  float m = v[0];
  for (int i = 1; i < 8; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// exp(x) for x <= 0 (softmax weights), relative error ~2e-7 on [-87, 0]; lanes below -87
// return 0. Range reduction to 2^n * exp(r), |r| <= ln2/2, degree-6 polynomial.
inline v8f exp8_nonpositive(v8f x) {
  const v8f lo = splat8(-87.0f);
  const v8i underflow = x < lo;
  x = x < lo ? lo : x;
  const v8f log2e = splat8(1.44269504088896341f);
  v8f n = x * log2e;
  // round to nearest: (n + 1.5*2^23) - 1.5*2^23
  const v8f magic = splat8(12582912.0f);
  n = (n + magic) - magic;
  const v8f r = x - n * splat8(0.693359375f) + n * splat8(2.12194440e-4f);
  v8f p = splat8(1.9875691500e-4f);
  p = p * r + splat8(1.3981999507e-3f);
  p = p * r + splat8(8.3334519073e-3f);
  p = p * r + splat8(4.1665795894e-2f);
  p = p * r + splat8(1.6666665459e-1f);
  p = p * r + splat8(5.0000001201e-1f);
  p = p * r * r + r + splat8(1.0f);
  v8i e = __builtin_convertvector(n, v8i);
  e = (e + 127) << 23;
  v8f scale;
  std::memcpy(&scale, &e, sizeof(scale));
  v8f out = p * scale;
  return underflow ? splat8(0.0f) : out;
}

// Element conversion of a contiguous run of n (multiple of 8) elements to fp32.
inline void to_float_n(const float* src, float* dst, int n) { std::memcpy(dst, src, sizeof(float) * n); }
inline void to_float_n(const bf16_t* src, float* dst, int n) {
  for (int i = 0; i < n; ++i) dst[i] = bits_float(uint32_t(src[i].bits) << 16);
}
inline void to_float_n(const half_t* src, float* dst, int n) {
  for (int i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

template <typename T>
inline void from_float_n(const float* src, T* dst, int n, float mul) {
  for (int i = 0; i < n; ++i) dst[i] = from_float<T>(src[i] * mul);
}

}  // namespace cm3rt::cpu
