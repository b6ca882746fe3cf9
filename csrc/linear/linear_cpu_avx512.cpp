// AVX-512 weight-streaming linear (see linear.h), compiled when the build CPU has AVX-512
// F/BW/VL (-march=native); linear_cpu.cpp falls back to the portable 8-lane kernel otherwise.
//
// OpenMP splits the output channels into blocks of C; a block's C weight rows (at most
// C x K x 4 B, which stays in L1/L2) are read from memory once, and every block of R rows of
// x runs a full-K register tile of R x C 16-lane accumulators against them. Per 16
// elements of K a tile does R x C multiply-adds for C weight loads, so narrow weights are
// widened once per tile, not once per row.
//
// Both operands are widened to fp32 and multiplied with FMA: weights inside the tile (int8:
// sign-extend + convert; bf16: shift into the high half), bf16 x once per call. Where the
// CPU has the instructions, two pairs skip the widening: bf16 x with bf16 weights multiply
// with VDPBF16PS (AVX512_BF16), and int8 weights with x as int16 with VPDPWSSD
// (AVX512_VNNI). On AMD Zen 4 (2816 x 1024, M = 8, one thread) both run at ~60 G
// multiply-adds/s, that instruction's rate there: bf16 1305 -> 306-353 us, int8 629 ->
// 407 us, fp32 (FMA) ~970 us.
// K tails use masked loads, so any K works without a scalar loop.
#include "linear/linear_cpu_avx512.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// GCC 12's AVX-512 headers trip -Wuninitialized on their own _mm512_undefined_* values.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "cpu/scratch.h"
#include "cpu/vec512.h"
#include "linear/weights_prefetch.h"

namespace cm3rt {

namespace {

using cpu::load16;

// Lane i of the result = the sum of the 16 lanes of v[i]: a tree of 15 shuffle + add pairs
// instead of 16 separate reductions (those cost more than the FMAs when K is small, e.g. the
// image-span lm_head of a small model).
inline __m512 reduce16(const __m512* v) {
  __m512 r[8], s[4], t[2];
  for (int i = 0; i < 8; ++i)  // 256-bit halves: lanes 0-7 from v[2i], 8-15 from v[2i + 1]
    r[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 4; ++i)  // 128-bit quarter q from v[4i + q]
    s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(r[2 * i], r[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(r[2 * i], r[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int i = 0; i < 2; ++i)  // in quarter q: 2 lanes from v[8i + q], 2 from v[8i + 4 + q]
    t[i] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // lane 4q + j holds the sum of v[q + 4j]; put v[i]'s sum in lane i
  const __m512 u = _mm512_add_ps(_mm512_shuffle_ps(t[0], t[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(t[0], t[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i lane_of = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  return _mm512_permutexvar_ps(lane_of, u);
}

using cpu::PrefetchTo;
using cpu::prefetch_weights;
using cpu::weights_prefetch_target;

// Dot products of R rows of x (row r at x + r * xs) with C weight rows w[c] over all of K,
// by widening to fp32 and FMA: dots[r * C + c].
template <int R, int C, PrefetchTo kTo, typename TX, typename TW>
void tile_fma(const TX* x, int64_t xs, const TW* const* w, int64_t ahead, int K, float* dots) {
  static_assert(R * C <= 16, "the tile's dots are reduced as one 16-lane vector");
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  int k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[C];
    for (int c = 0; c < C; ++c) {
      if ((k * int(sizeof(TW))) % 64 == 0)  // once per cache line
        prefetch_weights<kTo>(w[c] + k + ahead);
      wv[c] = load16(w[c] + k);
    }
    for (int r = 0; r < R; ++r) {
      const __m512 xv = load16(x + r * xs + k);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  if (k < K) {
    const __mmask16 m = cpu::first_lanes(K - k);
    __m512 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = load16(w[c] + k, m);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = load16(x + r * xs + k, m);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  __m512 v[16];
  for (int i = 0; i < 16; ++i) v[i] = i < R * C ? acc[i / C][i % C] : _mm512_setzero_ps();
  _mm512_storeu_ps(dots, reduce16(v));
}

#if defined(__AVX512BF16__)
// The same dots for bf16 x and bf16 weights with VDPBF16PS: 32 elements of K a step, each
// lane the exact products of one bf16 pair added to its fp32 accumulator (denormals
// flushed), so nothing is widened. On AMD Zen 4 (2816 x 1024, M = 8, one thread) it takes
// 306 us where widening + FMA took 1305; on Sapphire Rapids it runs at half the FMA rate,
// but there the AMX kernel takes bf16 weights first.
template <int R, int C, PrefetchTo kTo>
void tile_dpbf16(const bf16_t* x, int64_t xs, const bf16_t* const* w, int64_t ahead, int K,
                 float* dots) {
  static_assert(R * C <= 16, "the tile's dots are reduced as one 16-lane vector");
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  auto load = [](const bf16_t* q, __mmask32 m, bool full) {
    return (__m512bh)(full ? _mm512_loadu_si512(q) : _mm512_maskz_loadu_epi16(m, q));
  };
  auto step = [&](int k, __mmask32 m, bool full) {
    __m512bh wv[C];
    for (int c = 0; c < C; ++c) {
      prefetch_weights<kTo>(w[c] + k + ahead);
      wv[c] = load(w[c] + k, m, full);
    }
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = load(x + r * xs + k, m, full);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, wv[c]);
    }
  };
  int k = 0;
  for (; k + 32 <= K; k += 32) step(k, 0, true);
  if (k < K) step(k, __mmask32((1ull << (K - k)) - 1), false);  // zeros past K add nothing
  __m512 v[16];
  for (int i = 0; i < 16; ++i) v[i] = i < R * C ? acc[i / C][i % C] : _mm512_setzero_ps();
  _mm512_storeu_ps(dots, reduce16(v));
}
#endif

#if defined(__AVX512VNNI__)
// int8 weights with x as int16: x ~= s q, q = round(x / s) with s = max|x_row| / 32767
// (error <= s / 2, 1.5e-5 of the row's largest element, the AMX kernel's two int8 digits'
// precision), and VPDPWSSD adds the exact products of 32 (q, w) pairs into 16 int32 lanes;
// the weights are sign-extended to int16 (once per tile, not per row) but never converted to
// float. A lane adds 2 products of |q w| <= 32767 * 127 per 32 elements of K, so int32 holds
// kDotChunk elements (256 products, 1.07e9 < 2^31) before the sums fold into fp32.
constexpr int kDotChunk = 4096;

template <int R, int C, PrefetchTo kTo>
void tile_dpwssd(const int16_t* x, int64_t xs, const int8_t* const* w, int64_t ahead, int K,
                 float* dots) {
  static_assert(R * C <= 16, "the tile's dots are reduced as one 16-lane vector");
  alignas(64) float sums[R * C][16] = {};  // fp32 folds of the int32 chunks (rarely touched)
  for (int k0 = 0; k0 < K; k0 += kDotChunk) {
    const int k1 = std::min(K, k0 + kDotChunk);
    __m512i acc[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_si512();
    auto step = [&](int k, __mmask32 m, bool full) {
      __m512i wv[C];
      for (int c = 0; c < C; ++c) {
        if (k % 64 == 0)  // once per cache line
          prefetch_weights<kTo>(w[c] + k + ahead);
        const __m256i b = full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[c] + k))
                               : _mm256_maskz_loadu_epi8(m, w[c] + k);
        wv[c] = _mm512_cvtepi8_epi16(b);
      }
      for (int r = 0; r < R; ++r) {
        const int16_t* xr = x + r * xs + k;
        const __m512i xv = full ? _mm512_loadu_si512(xr) : _mm512_maskz_loadu_epi16(m, xr);
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpwssd_epi32(acc[r][c], xv, wv[c]);
      }
    };
    int k = k0;
    for (; k + 32 <= k1; k += 32) step(k, 0, true);
    if (k < k1) step(k, __mmask32((1ull << (k1 - k)) - 1), false);  // zeros add nothing
    for (int i = 0; i < R * C; ++i)
      _mm512_store_ps(sums[i], _mm512_add_ps(_mm512_load_ps(sums[i]),
                                             _mm512_cvtepi32_ps(acc[i / C][i % C])));
  }
  __m512 v[16];
  for (int i = 0; i < 16; ++i) v[i] = i < R * C ? _mm512_load_ps(sums[i]) : _mm512_setzero_ps();
  _mm512_storeu_ps(dots, reduce16(v));
}

// Whether rows [0, M) of x hold no NaN or infinity (x - x is NaN exactly for those).
template <typename TX>
bool rows_finite(const TX* x, int64_t xs, int M, int K) {
  for (int m = 0; m < M; ++m)
    for (int k = 0; k < K; k += 16) {
      const __m512 v = cpu::load16(x + int64_t(m) * xs + k, cpu::first_lanes(K - k));
      const __m512 d = _mm512_sub_ps(v, v);
      if (_mm512_cmp_ps_mask(d, d, _CMP_UNORD_Q)) return false;
    }
  return true;
}

// Rows [0, M) of finite x (fp32 or bf16) as int16 rows of K (contiguous) and their scales.
template <typename TX>
void quantize_rows_int16(const TX* x, int64_t xs, int M, int K, int16_t* q, float* scales) {
  for (int m = 0; m < M; ++m) {
    const TX* row = x + int64_t(m) * xs;
    __m512 vmax = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 16)
      vmax = _mm512_max_ps(vmax, _mm512_abs_ps(cpu::load16(row + k, cpu::first_lanes(K - k))));
    const float amax = _mm512_reduce_max_ps(vmax);
    scales[m] = amax > 0.0f ? amax / 32767.0f : 1.0f;
    const __m512 inv = _mm512_set1_ps(1.0f / scales[m]);
    int16_t* out = q + int64_t(m) * K;
    for (int k = 0; k < K; k += 16) {
      const __mmask16 mask = cpu::first_lanes(K - k);
      const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(cpu::load16(row + k, mask), inv));
      _mm256_mask_storeu_epi16(out + k, mask, _mm512_cvtsepi32_epi16(v));
    }
  }
}
#endif

// Tile shapes: R x C = 16 accumulators + C weights + 1 x fit the 32 zmm registers and are
// enough independent FMA chains to hide the FMA latency (4 cycles, 2 per cycle). C = 2
// channels x 8 rows from 8 rows (each weight vector widened once for 8 rows: 15% faster
// than 4 x 4 at M = 8 in fp32), 4 x 4 from 4 rows, 8 channels x 2 rows below; smaller
// tiles for the last rows.

template <typename TW, int R, int C, PrefetchTo kTo, typename TX>
void tile_dispatch(const TX* x, int64_t xs, const TW* const* w, int64_t ahead, int K, int nr,
                   float* dots) {
  // nr (< R for the last rows of x) picks a smaller instance, so no lane is wasted on rows
  // that do not exist.
  if constexpr (R > 1) {
    if (nr < R) return tile_dispatch<TW, R / 2, C, kTo>(x, xs, w, ahead, K, nr, dots);
  }
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<TX, bf16_t>) {
    static_assert(std::is_same_v<TW, bf16_t>, "bf16 x goes to the tile with bf16 weights");
    return tile_dpbf16<R, C, kTo>(x, xs, w, ahead, K, dots);
  }
#endif
#if defined(__AVX512VNNI__)
  if constexpr (std::is_same_v<TX, int16_t>) {
    static_assert(std::is_same_v<TW, int8_t>, "int16 x goes to the tile with int8 weights");
    return tile_dpwssd<R, C, kTo>(x, xs, w, ahead, K, dots);
  }
#endif
  if constexpr (std::is_same_v<TX, float>) tile_fma<R, C, kTo>(x, xs, w, ahead, K, dots);
}

// out rows [0, M) of one block of rows x (fp32, or bf16 for the VDPBF16PS tile; stride xs),
// C output channels per block.
template <typename TW, int C, PrefetchTo kTo, typename TX, typename TO>
void linear_rows(const TX* x, int64_t xs, int M, const LinearParams& p, TO* out,
                 const float* x_scales) {
  constexpr int kRows = 16 / C;  // rows per tile: R x C = 16 accumulators
  const TW* w = static_cast<const TW*>(p.w);
  const int blocks = (p.N + C - 1) / C;
#pragma omp parallel for schedule(static)
  for (int b = 0; b < blocks; ++b) {
    const int n0 = b * C, nc = std::min(C, p.N - n0);
    const TW* rows[C];
    // Past the last channel the tile repeats the last row; those dots are dropped.
    for (int c = 0; c < C; ++c) rows[c] = w + int64_t(n0 + std::min(c, nc - 1)) * p.w_stride;
    alignas(64) float dots[16];  // R x C <= 16
    for (int m0 = 0; m0 < M;) {
      int nr = kRows;  // the largest power-of-two tile the remaining rows fill
      while (nr > M - m0) nr /= 2;
      tile_dispatch<TW, kRows, C, kTo>(x + int64_t(m0) * xs, xs, rows, C * p.w_stride, p.K,
                                       nr, dots);
      for (int r = 0; r < nr; ++r) {
        const float xs_r = x_scales ? x_scales[m0 + r] : 1.0f;
        for (int c = 0; c < nc; ++c) {
          const float s = p.scales ? p.scales[n0 + c] : 1.0f;
          out[int64_t(m0 + r) * p.out_stride + n0 + c] =
              from_float<TO>(dots[r * C + c] * xs_r * s);
        }
      }
      m0 += nr;
    }
  }
}

// x_scales: the int16 rows' scales (x = x_scales[r] * q), else nullptr.
template <typename TW, typename TX, typename TO>
void linear_rows(const TX* x, int64_t xs, int M, const LinearParams& p, TO* out,
                 const float* x_scales = nullptr) {
  auto run = [&](auto to) {
    constexpr PrefetchTo kTo = decltype(to)::value;
    if (M >= 8) return linear_rows<TW, 2, kTo>(x, xs, M, p, out, x_scales);
    if (M >= 4) return linear_rows<TW, 4, kTo>(x, xs, M, p, out, x_scales);
    linear_rows<TW, 8, kTo>(x, xs, M, p, out, x_scales);
  };
  if (weights_prefetch_target() == PrefetchTo::kL2)
    run(std::integral_constant<PrefetchTo, PrefetchTo::kL2>{});
  else
    run(std::integral_constant<PrefetchTo, PrefetchTo::kL1>{});
}

#if defined(__AVX512VNNI__)
// int8 weights: x as int16 rows (quantize_rows_int16), a block of rows at a time; false
// (nothing written) when x holds NaN or infinity.
template <typename TX>
bool linear_int8_vnni(const LinearParams& p) {
  const TX* x = static_cast<const TX*>(p.x);
  if (!rows_finite(x, p.x_stride, p.M, p.K)) return false;
  TX* out = static_cast<TX*>(p.out);
  int16_t* q = cpu::thread_scratch<int16_t>(size_t(std::min(p.M, kLinearRowBlock)) * p.K);
  float scales[kLinearRowBlock];
  for (int m0 = 0; m0 < p.M; m0 += kLinearRowBlock) {
    const int nr = std::min(kLinearRowBlock, p.M - m0);
    quantize_rows_int16(x + int64_t(m0) * p.x_stride, p.x_stride, nr, p.K, q, scales);
    linear_rows<int8_t>(q, p.K, nr, p, out + int64_t(m0) * p.out_stride, scales);
  }
  return true;
}
#endif

template <typename TX, typename TW>
void linear_impl(const LinearParams& p) {
  TX* out = static_cast<TX*>(p.out);
#if defined(__AVX512VNNI__)
  if constexpr (std::is_same_v<TW, int8_t>) {
    if (linear_int8_vnni<TX>(p)) return;
  }
#endif
  if constexpr (std::is_same_v<TX, float>) {
    linear_rows<TW>(static_cast<const float*>(p.x), p.x_stride, p.M, p, out);
#if defined(__AVX512BF16__)
  } else if constexpr (std::is_same_v<TW, bf16_t>) {  // bf16 x bf16: VDPBF16PS, x as it is
    linear_rows<TW>(static_cast<const bf16_t*>(p.x), p.x_stride, p.M, p, out);
#endif
  } else {
    // bf16 x with fp32 / int8 weights (or without AVX512_BF16) is widened to fp32 once per
    // block of rows: widening it inside the tile would cost as much as the FMAs (2
    // instructions per 16 elements per row).
    const TX* x = static_cast<const TX*>(p.x);
    float* xf = cpu::thread_scratch<float>(size_t(std::min(p.M, kLinearRowBlock)) * p.K);
    for (int m0 = 0; m0 < p.M; m0 += kLinearRowBlock) {
      const int nr = std::min(kLinearRowBlock, p.M - m0);
      for (int r = 0; r < nr; ++r) {
        const TX* src = x + int64_t(m0 + r) * p.x_stride;
        float* dst = xf + size_t(r) * p.K;
        for (int k = 0; k < p.K; ++k) dst[k] = to_float(src[k]);
      }
      linear_rows<TW>(xf, p.K, nr, p, out + int64_t(m0) * p.out_stride);
    }
  }
}

template <typename TX>
bool dispatch_weights(const LinearParams& p) {
  switch (p.w_dtype) {
    case DType::kFloat32: linear_impl<TX, float>(p); return true;
    case DType::kBFloat16: linear_impl<TX, bf16_t>(p); return true;
    case DType::kInt8: linear_impl<TX, int8_t>(p); return true;
    default: return false;
  }
}

}  // namespace

bool linear_cpu_avx512(const LinearParams& p) {
  if (p.x_dtype == DType::kFloat32) return dispatch_weights<float>(p);
  if (p.x_dtype == DType::kBFloat16) return dispatch_weights<bf16_t>(p);
  return false;
}

}  // namespace cm3rt

#else  // no AVX-512 at build time




namespace cm3rt {
bool linear_cpu_avx512(const LinearParams&) { return false; }
}  // namespace cm3rt

#endif
