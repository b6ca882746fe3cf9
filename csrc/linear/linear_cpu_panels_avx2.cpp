// AVX2 + FMA linear on packed weights (panels of 16 output channels, see linear.h), for CPUs
// without the AVX-512 panel kernel (linear_cpu_panels_avx512.cpp) or the pair it lacks
// (bf16 weights without AVX512_BF16, int8 without AVX512_VNNI); compiled when the build CPU
// has AVX2 and FMA, otherwise linear_cpu takes the portable panel loop.
//
// x is copied once per call into tiles of up to 6 rows (int8: 5) laid out [K][rows], and a
// tile keeps 6 x 2 accumulators of 8 channels (one panel) in the 16 ymm registers, with
// one weight vector per half and the broadcast of x: each weight vector feeds every row of
// the tile.
// fp32 and bf16 weights multiply in fp32 (bf16 widened by a shift; x widened to fp32):
// exact products, fp32 sums. int8 weights multiply as int16 pairs (VPMADDWD) with x
// quantised per row to int16 (x ~= s q, 1.5e-5 of the row's largest element, as the AVX-512
// kernels do; rows with NaN / inf go to the portable loop): one instruction covers two steps
// of K where widening int8 to fp32 would cost more than the multiply-adds, and the int32
// sums are exact, folded into fp32 every kFoldPairs pairs. Tiles of fewer than 4 rows run
// interleaved copies of their fp32 accumulators over alternate steps of K, to keep 8
// multiply-add chains in flight (the int32 chains add in one cycle and need none).
// OpenMP splits the panels; each is read from memory once and serves every row of x (from
// L2 after the first tile), the next panel prefetched meanwhile (weights_prefetch.h).
#include "linear/linear_cpu_panels_avx2.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>

#include "cpu/scratch.h"
#include "linear/weights_prefetch.h"

namespace cm3rt {

namespace {

using cpu::PrefetchTo;

constexpr int kMaxTileRows = 6;  // 6 x 2 accumulators + weight + broadcast: 15 of 16 ymm
// Tile heights per weight dtype: int8 stops at 5, since at 6 its 12 accumulators, 2 weight
// vectors, the broadcast and VPMADDWD's product need 17 registers (one spills every step).
template <typename TW> constexpr int max_tile_rows() {
  return std::is_same_v<TW, int8_t> ? 5 : kMaxTileRows;
}
// VPMADDWD sums 2 products of |q x| <= 32767 and |w| <= 128 into a lane: int32 holds 256
// such pairs (2.147e9 < 2^31) before the sums fold into fp32.
constexpr int kFoldPairs = 256;

inline float widen(float v) { return v; }
inline float widen(bf16_t v) { return to_float(v); }

// The lines of the next panel a tile prefetches: line(kk) at step kk of K, `rate` lines per
// step in 1/65536ths, so a tile of nr of the M rows spreads nr / M of the panel's lines
// evenly over its steps and the memory stream stays busy through every tile (not only the
// first). One prefetch a step and no branch: a branch in the step made GCC version the loop
// and keep the accumulators in memory.
struct Ahead {
  const char* base;
  int64_t rate;
  const char* line(int kk) const { return base + ((int64_t(kk) * rate) >> 16) * 64; }
};

// Runs f(std::integral_constant<int, i>{}) for i = 0 .. N - 1. The accumulators live in
// arrays indexed only by such constants: with a loop index instead, GCC keeps the array in
// memory and stores every accumulator at every step of K (measured here: fp32 M = 512
// 87.9 -> 33.9 ms, 2816 x 1024, one thread).
template <typename F, int... i>
__attribute__((always_inline)) inline void unrolled_impl(F& f, std::integer_sequence<int, i...>) {
  (f(std::integral_constant<int, i>{}), ...);
}
template <int N, typename F>
__attribute__((always_inline)) inline void unrolled(F&& f) {
  unrolled_impl(f, std::make_integer_sequence<int, N>{});
}

// Element i (of g) of one panel step of fp32 or bf16 weights, channels [8h, 8h + 8), as
// fp32 (the step's size and g are the pack's, linear.h). A step is 16 floats (fp32, g = 1)
// or 16 channels x (even, odd) bf16 pairs as 32-bit units (64 bytes). Loaded again for each
// i (an L1 hit): one widened vector per half is live.
template <typename TW> struct Step;

template <> struct Step<float> {
  static constexpr int kG = 1, kBytes = 64;
  static __m256 load(const char* s, int h, int) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(s) + 8 * h);
  }
};

template <> struct Step<bf16_t> {
  static constexpr int kG = 2, kBytes = 64;
  static __m256 load(const char* s, int h, int i) {
    const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 32 * h));
    return _mm256_castsi256_ps(i == 0 ? _mm256_slli_epi32(u, 16)  // even k: low half
                                      : _mm256_and_si256(u, _mm256_set1_epi32(int(0xFFFF0000u))));
  }
};

// int8: 16 channels x (even, odd) int8 pairs (32 bytes), multiplied as int16 (tile_int8).
template <> struct Step<int8_t> { static constexpr int kG = 2, kBytes = 32; };

template <int R> constexpr int unroll() { return R >= 4 ? 1 : 4 / R; }

// res[r][16] = the dot products of the R rows of the packed tile xt ([K'][R] fp32, K' = Kg g,
// element k of row r at xt[k R + r]) with the panel, over all Kg steps. Accumulator
// 2 (u R + r) + h holds row r, channels [8h, 8h + 8), of copy u.
template <typename TW, int R, PrefetchTo kTo>
void tile(const float* __restrict xt, const char* __restrict panel, Ahead ahead, int Kg,
          float* __restrict res) {
  constexpr int G = Step<TW>::kG, U = unroll<R>();
  __m256 acc[2 * U * R];
  unrolled<2 * U * R>([&](auto j) { acc[j] = _mm256_setzero_ps(); });
  // Forced inline: called from two loops, GCC may keep it a call, pass acc by address and
  // so keep the accumulators in memory.
  auto step = [&](int kk, auto u) __attribute__((always_inline)) {  // step kk into copy u
    const char* s = panel + int64_t(kk) * Step<TW>::kBytes;
    cpu::prefetch_weights<kTo>(ahead.line(kk));
    unrolled<G>([&](auto i) {
      const __m256 w0 = Step<TW>::load(s, 0, i), w1 = Step<TW>::load(s, 1, i);
      const float* xk = xt + (int64_t(kk) * G + i) * R;
      unrolled<R>([&](auto r) {
        constexpr int j = 2 * (decltype(u)::value * R + decltype(r)::value);
        const __m256 xv = _mm256_broadcast_ss(xk + r);
        acc[j] = _mm256_fmadd_ps(xv, w0, acc[j]);
        acc[j + 1] = _mm256_fmadd_ps(xv, w1, acc[j + 1]);
      });
    });
  };
  int kk = 0;
  for (; kk + U <= Kg; kk += U)
    unrolled<U>([&](auto u) __attribute__((always_inline)) { step(kk + u, u); });
  for (; kk < Kg; ++kk) step(kk, std::integral_constant<int, 0>{});
  unrolled<R>([&](auto r) {
    unrolled<2>([&](auto h) {
      __m256 sum = acc[2 * r + h];
      unrolled<U - 1>([&](auto u) { sum = _mm256_add_ps(sum, acc[2 * ((u + 1) * R + r) + h]); });
      _mm256_storeu_ps(res + r * 16 + 8 * h, sum);
    });
  });
}

// The same for int8 weights: xt holds x as int16 pairs ([Kg][R] 32-bit units, even k low),
// a panel step 16 channels x (even, odd) int8 pairs (32 bytes); res gets the sums in units
// of (x scale) x (weight scale).
template <int R, PrefetchTo kTo>
void tile_int8(const uint32_t* __restrict xt, const char* __restrict panel, Ahead ahead,
               int Kg, float* __restrict res) {
  __m256 sums[2 * R];
  unrolled<2 * R>([&](auto j) { sums[j] = _mm256_setzero_ps(); });
  for (int k0 = 0; k0 < Kg; k0 += kFoldPairs) {
    const int k1 = std::min(Kg, k0 + kFoldPairs);
    __m256i acc[2 * R];
    unrolled<2 * R>([&](auto j) { acc[j] = _mm256_setzero_si256(); });
    for (int kk = k0; kk < k1; ++kk) {
      const char* s = panel + int64_t(kk) * 32;
      cpu::prefetch_weights<kTo>(ahead.line(kk));
      const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
      const __m256i w1 =
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 16)));
      const uint32_t* xk = xt + int64_t(kk) * R;
      unrolled<R>([&](auto r) {
        const __m256i xv = _mm256_set1_epi32(int(xk[r]));
        acc[2 * r] = _mm256_add_epi32(acc[2 * r], _mm256_madd_epi16(xv, w0));
        acc[2 * r + 1] = _mm256_add_epi32(acc[2 * r + 1], _mm256_madd_epi16(xv, w1));
      });
    }
    unrolled<2 * R>([&](auto j) { sums[j] = _mm256_add_ps(sums[j], _mm256_cvtepi32_ps(acc[j])); });
  }
  unrolled<2 * R>([&](auto j) { _mm256_storeu_ps(res + 8 * j, sums[j]); });
}

// ahead: this tile's share of the next panel's cache lines, prefetched while it reads its
// own panel, so that the weight stream from memory runs under the multiply-adds. Measured
// here (AMD Zen 3, the GEMMs of one decode step of bench_engine's model, M = 8, one thread,
// weights past the L3), with 4 + 4-row tiles: no prefetch fp32 46.5 ms, bf16 27.5, int8
// 17.4; the first tile prefetching the whole next panel 39 / 23.5 / 15.5 (into L1 or L2
// alike). With 6 + 2-row tiles: the first tile prefetching all 30.1 / 21.6 / 15.0 (the
// memory stream idles through the other tiles), every tile its share 25.5 / 20.8 / 14.7.
template <typename TW, PrefetchTo kTo, int R = max_tile_rows<TW>()>
void tile_rows(int nr, const void* xt, const char* panel, Ahead ahead, int Kg,
               float* res) {
  if constexpr (R > 1) {
    if (nr < R) return tile_rows<TW, kTo, R - 1>(nr, xt, panel, ahead, Kg, res);
  }
  if constexpr (std::is_same_v<TW, int8_t>)
    tile_int8<R, kTo>(static_cast<const uint32_t*>(xt), panel, ahead, Kg, res);
  else
    tile<TW, R, kTo>(static_cast<const float*>(xt), panel, ahead, Kg, res);
}

// Rows of the next tile when `left` rows remain: as many as a tile holds. (Splitting evenly
// instead, 8 = 4 + 4, was slower: the GEMMs of one bench_engine decode step, M = 8, one
// thread, fp32 39.4 -> 32.2 ms with 6 + 2, bf16 23.3 -> 21.6, int8 16.0 -> 15.4 with 5 + 3.)
template <typename TW>
int tile_height(int left) {
  return std::min(left, max_tile_rows<TW>());
}

// x as tiles: the tile of rows [m0, m0 + nr) at xt + m0 Kg, unit kk of row m0 + r at
// [kk nr + r], so a tile's broadcasts walk one contiguous block. A unit is g fp32 values
// (fp32 / bf16 weights) or an int16 pair (int8 weights, x quantised per row: scales[m]);
// zeros past K. False (nothing computed) when int8's x holds NaN or infinity.
template <typename TX, typename TW>
bool pack_x(const LinearParams& p, int Kg, void* xt_out, float* scales) {
  const TX* x = static_cast<const TX*>(p.x);
  for (int m0 = 0; m0 < p.M;) {
    const int nr = tile_height<TW>(p.M - m0);
    for (int r = 0; r < nr; ++r) {
      const TX* row = x + int64_t(m0 + r) * p.x_stride;
      if constexpr (std::is_same_v<TW, int8_t>) {
        uint32_t* dst = static_cast<uint32_t*>(xt_out) + int64_t(m0) * Kg + r;
        float amax = 0.0f;
        for (int k = 0; k < p.K; ++k) {
          const float v = widen(row[k]);
          if (!std::isfinite(v)) return false;
          amax = std::max(amax, std::fabs(v));
        }
        const float scale = amax > 0.0f ? amax / 32767.0f : 1.0f, inv = 1.0f / scale;
        scales[m0 + r] = scale;
        auto q = [&](int k) -> uint32_t {
          if (k >= p.K) return 0;
          const long v = std::lrintf(widen(row[k]) * inv);  // nearest, ties to even
          return uint16_t(int16_t(std::clamp(v, -32767L, 32767L)));
        };
        for (int kk = 0; kk < Kg; ++kk) dst[int64_t(kk) * nr] = q(2 * kk) | q(2 * kk + 1) << 16;
      } else {
        constexpr int G = Step<TW>::kG;
        float* dst = static_cast<float*>(xt_out) + int64_t(m0) * Kg * G + r;
        for (int k = 0; k < p.K; ++k) dst[int64_t(k) * nr] = widen(row[k]);
        for (int k = p.K; k < Kg * G; ++k) dst[int64_t(k) * nr] = 0.0f;
      }
    }
    m0 += nr;
  }
  return true;
}

template <typename TX, typename TW, PrefetchTo kTo>
bool run(const LinearParams& p) {
  constexpr bool kInt8 = std::is_same_v<TW, int8_t>;
  constexpr int G = Step<TW>::kG, kStepBytes = Step<TW>::kBytes;
  const int Kg = (p.K + G - 1) / G;
  const int P = (p.N + kPanelChannels - 1) / kPanelChannels;
  const int64_t panel_bytes = int64_t(Kg) * kStepBytes, lines = (panel_bytes + 63) / 64;
  const int64_t x_units = int64_t(p.M) * Kg * (kInt8 ? 1 : G);  // 4 bytes each
  void* xt = cpu::thread_scratch<float>(size_t(x_units));
  float* x_scales = cpu::thread_scratch<float, 1>(size_t(p.M));
  if (!pack_x<TX, TW>(p, Kg, xt, x_scales)) return false;
  TX* out = static_cast<TX*>(p.out);
  const char* w = static_cast<const char*>(p.w);
#pragma omp parallel for schedule(static)
  for (int pi = 0; pi < P; ++pi) {
    const char* panel = w + pi * panel_bytes;
    const int n0 = pi * kPanelChannels, nc = std::min(kPanelChannels, p.N - n0);
    alignas(32) float res[kMaxTileRows * kPanelChannels];
    for (int m0 = 0; m0 < p.M;) {
      const int nr = tile_height<TW>(p.M - m0);
      const void* xb = static_cast<const float*>(xt) + int64_t(m0) * Kg * (kInt8 ? 1 : G);
      // The last panel has no next one: it "prefetches" its own lines (already in cache).
      const char* next = pi + 1 < P ? panel + panel_bytes : panel;
      const int64_t l0 = lines * m0 / p.M, l1 = lines * (m0 + nr) / p.M;
      const Ahead ahead{next + 64 * l0, Kg > 0 ? ((l1 - l0) << 16) / Kg : 0};
      tile_rows<TW, kTo>(nr, xb, panel, ahead, Kg, res);
      for (int r = 0; r < nr; ++r) {
        const float xs = kInt8 ? x_scales[m0 + r] : 1.0f;
        TX* orow = out + int64_t(m0 + r) * p.out_stride + n0;
        for (int i = 0; i < nc; ++i) {
          const float sc = p.scales ? p.scales[n0 + i] * xs : 1.0f;
          orow[i] = from_float<TX>(res[r * kPanelChannels + i] * sc);
        }
      }
      m0 += nr;
    }
  }
  return true;
}

template <typename TX, typename TW>
bool run_prefetching(const LinearParams& p) {
  if (cpu::weights_prefetch_target() == PrefetchTo::kL2) return run<TX, TW, PrefetchTo::kL2>(p);
  return run<TX, TW, PrefetchTo::kL1>(p);
}

}  // namespace

bool linear_cpu_panels_avx2_takes(DType x, DType w) {
  const bool x_ok = x == DType::kFloat32 || x == DType::kBFloat16;
  const bool w_ok = w == DType::kFloat32 || w == DType::kBFloat16 || w == DType::kInt8;
  return x_ok && w_ok;
}

bool linear_cpu_panels_avx2(const LinearParams& p) {
  const DType x = p.x_dtype, w = p.w_dtype;
  if (!linear_cpu_panels_avx2_takes(x, w)) return false;
  if (x == DType::kFloat32) {
    if (w == DType::kFloat32) return run_prefetching<float, float>(p);
    if (w == DType::kBFloat16) return run_prefetching<float, bf16_t>(p);
    return run_prefetching<float, int8_t>(p);
  }
  if (w == DType::kFloat32) return run_prefetching<bf16_t, float>(p);
  if (w == DType::kBFloat16) return run_prefetching<bf16_t, bf16_t>(p);
  return run_prefetching<bf16_t, int8_t>(p);
}

}  // namespace cm3rt

#else  // no AVX2 + FMA at build time

namespace cm3rt {
bool linear_cpu_panels_avx2_takes(DType, DType) { return false; }
bool linear_cpu_panels_avx2(const LinearParams&) { return false; }
}  // namespace cm3rt

#endif
