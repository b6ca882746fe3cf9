// Portable 8-lane float vectors for the CPU kernels (GCC/Clang vector extensions: AVX2 with
// -march=native on x86-64, NEON pairs on arm64, SSE pairs on a portable build).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/dtype.h"

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

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

typedef uint16_t v8u16 __attribute__((vector_size(16)));

// Loads 8 consecutive elements of any kernel dtype widened to fp32.
inline v8f load8(const bf16_t* p) {
#if defined(__AVX2__)
  // One widening load + shift (GCC lowers the generic version to 5 instructions).
  const __m256i w = _mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
  v8f f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
#else
  v8u16 h;
  std::memcpy(&h, p, sizeof(h));
  const v8i w = __builtin_convertvector(h, v8i) << 16;
  v8f f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
#endif
}
inline v8f load8(const half_t* p) {
#if defined(__F16C__)
  const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  v8f v;
  std::memcpy(&v, &f, sizeof(v));
  return v;
#else
  v8f v;
  for (int i = 0; i < 8; ++i) v[i] = to_float(p[i]);
  return v;
#endif
}

// int8 (weight-only quantised weights) widened to fp32; the per-channel scale is the caller's.
inline v8f load8(const int8_t* p) {
#if defined(__AVX2__)
  const __m256 f = _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  v8f v;
  std::memcpy(&v, &f, sizeof(v));
  return v;
#else
  v8f v;
  for (int i = 0; i < 8; ++i) v[i] = float(p[i]);
  return v;
#endif
}

// Horizontal sums of 8 vectors at once: lane i of the result = sum of the lanes of a[i].
// Three shuffle+add levels instead of eight separate horizontal sums.
inline v8f reduce8x8(v8f a0, v8f a1, v8f a2, v8f a3, v8f a4, v8f a5, v8f a6, v8f a7) {
#define CM3RT_PAIRSUM(x, y)                                               \
  (__builtin_shufflevector(x, y, 0, 2, 4, 6, 8, 10, 12, 14) +             \
   __builtin_shufflevector(x, y, 1, 3, 5, 7, 9, 11, 13, 15))
  const v8f b01 = CM3RT_PAIRSUM(a0, a1), b23 = CM3RT_PAIRSUM(a2, a3);
  const v8f b45 = CM3RT_PAIRSUM(a4, a5), b67 = CM3RT_PAIRSUM(a6, a7);
  const v8f c03 = CM3RT_PAIRSUM(b01, b23), c47 = CM3RT_PAIRSUM(b45, b67);
  return CM3RT_PAIRSUM(c03, c47);
#undef CM3RT_PAIRSUM
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

// 8 fp32 lanes rounded to T and back (round to nearest even; NaN stays NaN), as
// to_float(from_float<T>(v)) lane by lane: the rounding points of a half-precision op.
typedef uint32_t v8u __attribute__((vector_size(32)));
inline v8u bf16_bits8(v8f v) {  // the bf16 bits of each lane, in the low 16 bits
  v8u u;
  std::memcpy(&u, &v, sizeof(u));
  const v8u rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return ((u & 0x7fffffffu) > 0x7f800000u) ? ((u >> 16) | 0x40u) : rounded;
}
template <typename T> inline v8f round8(v8f v);
template <> inline v8f round8<float>(v8f v) { return v; }
template <> inline v8f round8<bf16_t>(v8f v) {
  const v8u b = bf16_bits8(v) << 16;
  v8f f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}
template <> inline v8f round8<half_t>(v8f v) {
#if defined(__F16C__)
  __m256 x;
  std::memcpy(&x, &v, sizeof(x));
  const __m256 r = _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
  v8f f;
  std::memcpy(&f, &r, sizeof(f));
  return f;
#else
  for (int i = 0; i < 8; ++i) v[i] = to_float(from_float<half_t>(v[i]));
  return v;
#endif
}

// Stores 8 fp32 lanes as T, rounded as from_float<T>.
inline void store8(bf16_t* p, v8f v) {
  const v8u16 h = __builtin_convertvector(bf16_bits8(v), v8u16);
  std::memcpy(p, &h, sizeof(h));
}
inline void store8(half_t* p, v8f v) {
#if defined(__F16C__)
  __m256 x;
  std::memcpy(&x, &v, sizeof(x));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
#else
  for (int i = 0; i < 8; ++i) p[i] = from_float<half_t>(v[i]);
#endif
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
