// AVX-512 linear on packed weights (panels of 16 output channels, see linear.h), compiled
// when the build CPU has AVX-512 F/BW/VL; linear_cpu falls back to the portable panel loop
// otherwise, or for a dtype pair this file does not take.
//
// x is packed once per call, 8 rows at a time, as [ceil(K / g)][8] 4-byte units (an fp32
// value, a bf16 pair or an int16 pair), and a register tile of R rows x CV panels keeps
// R x CV accumulators of 16 channels each: per step of K it loads CV weight vectors and
// broadcasts one unit per row, so x is read 4 bytes per 16 multiply-adds (from L1) and each
// weight vector feeds R rows. OpenMP splits the panels into groups of CV; a group's panels
// are read from memory once and serve every row of x (from L2 after the first 8 rows).
//
// Per dtype pair: fp32 x fp32 weights, FMA; bf16 x bf16 weights, VDPBF16PS (AVX512_BF16:
// exact products of a bf16 pair added to fp32 lanes, denormals flushed); fp32 or bf16 x with
// int8 weights, VPDPWSSD (AVX512_VNNI) on x quantised per row to int16 (x ~= s q, as the
// [N, K] kernel does: 1.5e-5 of the row's largest element, exact int32 sums folded into
// fp32 every kFoldPairs pairs; rows with NaN / inf go to the portable loop).
#include "linear/linear_cpu_avx512.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/scratch.h"
#include "cpu/vec512.h"
#include "linear/weights_prefetch.h"

namespace cm3rt {

namespace {

using cpu::PrefetchTo;

enum class Pair { kFp32, kBf16, kInt8 };  // the (x, weight) multiply a tile runs

constexpr int kRowBlock = 8;     // rows of x per packed block (the tallest tile)
constexpr int kTilePanels = 2;   // panels per register tile: 8 x 2 x 16 lanes = 16 zmm
// VPDPWSSD adds 2 products of |q w| <= 32767 x 127 per pair into a lane, so int32 holds
// 256 pairs (2.13e9 < 2^31) before the sums fold into fp32.
constexpr int kFoldPairs = 256;

template <Pair kPair> constexpr int unit_bytes_of_panel_step() {
  return kPair == Pair::kInt8 ? 32 : 64;  // 16 channels x g elements of K
}

// The accumulator (and widened weight) vector of a pair: int32 lanes for VPDPWSSD.
template <Pair kPair> struct AccOf { using type = __m512; };
template <> struct AccOf<Pair::kInt8> { using type = __m512i; };

// Broadcast tiles want >= 4 independent accumulator chains to hide the multiply-add
// latency: short tiles run U interleaved copies over alternate steps of K.
template <int R, int CV> constexpr int unroll() {
  return R * CV >= 4 ? 1 : (R * CV == 2 ? 2 : 4);
}

// acc[r][c] (16 lanes: channels 16 (p0 + c) ...) = the dot products of rows [0, R) of the
// packed block xt ([Kg][8] units, row r at xt[k * 8 + r]) with panels w[c * panel_bytes],
// over all Kg steps of K. res: [R][CV][16] fp32.
template <Pair kPair, int R, int CV, PrefetchTo kTo>
void tile(const uint32_t* xt, const char* w, int64_t panel_bytes, int Kg, float* res) {
  constexpr int U = unroll<R, CV>();
  constexpr int64_t kStep = unit_bytes_of_panel_step<kPair>();
  using Acc = typename AccOf<kPair>::type;
  alignas(64) float sums[R][CV][16] = {};  // int8: the folded chunks
  const int chunk = kPair == Pair::kInt8 ? kFoldPairs : Kg;
  for (int k0 = 0; k0 < Kg; k0 += chunk) {
    const int k1 = std::min(Kg, k0 + chunk);
    Acc acc[U][R][CV];
    for (int u = 0; u < U; ++u)
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < CV; ++c) {
          if constexpr (kPair == Pair::kInt8) acc[u][r][c] = _mm512_setzero_si512();
          else acc[u][r][c] = _mm512_setzero_ps();
        }
    auto step = [&](int k, int u) {
      Acc wv[CV];
      for (int c = 0; c < CV; ++c) {
        const char* line = w + c * panel_bytes + k * kStep;
        if (kStep == 64 || k % 2 == 0)  // once per cache line
          cpu::prefetch_weights<kTo>(line + CV * panel_bytes);
        if constexpr (kPair == Pair::kFp32) wv[c] = _mm512_loadu_ps(line);
        else if constexpr (kPair == Pair::kBf16) wv[c] = _mm512_loadu_ps(line);
        else wv[c] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(line)));
      }
      for (int r = 0; r < R; ++r) {
        const uint32_t unit = xt[int64_t(k) * kRowBlock + r];
        for (int c = 0; c < CV; ++c) {
          if constexpr (kPair == Pair::kFp32) {
            float v;
            std::memcpy(&v, &unit, 4);
            acc[u][r][c] = _mm512_fmadd_ps(_mm512_set1_ps(v), wv[c], acc[u][r][c]);
          } else if constexpr (kPair == Pair::kBf16) {
#if defined(__AVX512BF16__)
            acc[u][r][c] = _mm512_dpbf16_ps(acc[u][r][c], (__m512bh)_mm512_set1_epi32(int(unit)),
                                            (__m512bh)_mm512_castps_si512(wv[c]));
#endif
          } else {
#if defined(__AVX512VNNI__)
            acc[u][r][c] = _mm512_dpwssd_epi32(acc[u][r][c], _mm512_set1_epi32(int(unit)), wv[c]);
#endif
          }
        }
      }
    };
    int k = k0;
    for (; k + U <= k1; k += U)
      for (int u = 0; u < U; ++u) step(k + u, u);
    for (; k < k1; ++k) step(k, 0);
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < CV; ++c) {
        __m512 s = _mm512_load_ps(sums[r][c]);
        for (int u = 0; u < U; ++u) {
          if constexpr (kPair == Pair::kInt8) s = _mm512_add_ps(s, _mm512_cvtepi32_ps(acc[u][r][c]));
          else s = _mm512_add_ps(s, acc[u][r][c]);
        }
        _mm512_store_ps(sums[r][c], s);
      }
  }
  std::memcpy(res, sums, sizeof(sums));
}

// The R-row tile for nr rows (the largest power of two <= the rows left, R at most 8).
template <Pair kPair, int R, int CV, PrefetchTo kTo>
void tile_rows(int nr, const uint32_t* xt, const char* w, int64_t panel_bytes, int Kg,
               float* res) {
  if constexpr (R > 1) {
    if (nr < R) return tile_rows<kPair, R / 2, CV, kTo>(nr, xt, w, panel_bytes, Kg, res);
  }
  tile<kPair, R, CV, kTo>(xt, w, panel_bytes, Kg, res);
}

// x rows as packed blocks: xt[b][k][r] for rows 8b + r < M (rows past M are not read).
// int8: x quantised per row to int16 (scales[m]); false when x holds NaN or infinity.
template <Pair kPair, typename TX>
bool pack_x(const LinearParams& p, int Kg, uint32_t* xt, float* scales) {
  const TX* x = static_cast<const TX*>(p.x);
  for (int m = 0; m < p.M; ++m) {
    const TX* row = x + int64_t(m) * p.x_stride;
    uint32_t* dst = xt + int64_t(m / kRowBlock) * Kg * kRowBlock + m % kRowBlock;
    if constexpr (kPair == Pair::kFp32) {
      for (int k = 0; k < p.K; ++k) std::memcpy(dst + int64_t(k) * kRowBlock, row + k, 4);
    } else if constexpr (kPair == Pair::kBf16) {
      for (int kk = 0; kk < Kg; ++kk) {
        const uint32_t lo = row[2 * kk].bits;
        const uint32_t hi = 2 * kk + 1 < p.K ? row[2 * kk + 1].bits : 0;
        dst[int64_t(kk) * kRowBlock] = lo | hi << 16;
      }
    } else {
      float amax = 0.0f;
      for (int k = 0; k < p.K; ++k) {
        const float v = to_float(row[k]);
        if (!std::isfinite(v)) return false;
        amax = std::max(amax, std::fabs(v));
      }
      scales[m] = amax > 0.0f ? amax / 32767.0f : 1.0f;
      const float inv = 1.0f / scales[m];
      auto q = [&](int k) -> uint32_t {
        if (k >= p.K) return 0;
        const long v = std::lrintf(to_float(row[k]) * inv);  // nearest, ties to even
        return uint16_t(int16_t(std::clamp(v, -32767L, 32767L)));
      };
      for (int kk = 0; kk < Kg; ++kk) dst[int64_t(kk) * kRowBlock] = q(2 * kk) | q(2 * kk + 1) << 16;
    }
  }
  return true;
}

template <Pair kPair, PrefetchTo kTo, typename TX>
bool run(const LinearParams& p) {
  const int g = panel_group(p.w_dtype);
  const int Kg = (p.K + g - 1) / g, P = (p.N + kPanelChannels - 1) / kPanelChannels;
  const int64_t panel_bytes = int64_t(Kg) * unit_bytes_of_panel_step<kPair>();
  const int blocks = (p.M + kRowBlock - 1) / kRowBlock;
  uint32_t* xt = cpu::thread_scratch<uint32_t>(size_t(blocks) * Kg * kRowBlock);
  float* x_scales = cpu::thread_scratch<float>(size_t(p.M));
  if (!pack_x<kPair, TX>(p, Kg, xt, x_scales)) return false;
  TX* out = static_cast<TX*>(p.out);
  const char* w = static_cast<const char*>(p.w);
  const int groups = (P + kTilePanels - 1) / kTilePanels;
#pragma omp parallel for schedule(static)
  for (int gi = 0; gi < groups; ++gi) {
    const int p0 = gi * kTilePanels, np = std::min(kTilePanels, P - p0);
    const char* wg = w + p0 * panel_bytes;
    alignas(64) float res[kRowBlock * kTilePanels * kPanelChannels];
    for (int m0 = 0; m0 < p.M;) {
      int nr = kRowBlock;
      while (nr > p.M - m0) nr /= 2;
      const uint32_t* xb = xt + int64_t(m0 / kRowBlock) * Kg * kRowBlock + m0 % kRowBlock;
      if (np == kTilePanels)
        tile_rows<kPair, kRowBlock, kTilePanels, kTo>(nr, xb, wg, panel_bytes, Kg, res);
      else
        tile_rows<kPair, kRowBlock, 1, kTo>(nr, xb, wg, panel_bytes, Kg, res);
      for (int r = 0; r < nr; ++r) {
        const int m = m0 + r;
        const float xs = kPair == Pair::kInt8 ? x_scales[m] : 1.0f;
        TX* orow = out + int64_t(m) * p.out_stride;
        for (int c = 0; c < np; ++c) {
          const float* v = res + (r * np + c) * kPanelChannels;
          const int n0 = (p0 + c) * kPanelChannels, nc = std::min(kPanelChannels, p.N - n0);
          for (int i = 0; i < nc; ++i) {
            const float s = p.scales ? p.scales[n0 + i] * xs : 1.0f;
            orow[n0 + i] = from_float<TX>(v[i] * s);
          }
        }
      }
      m0 += nr;
    }
  }
  return true;
}

template <Pair kPair, typename TX>
bool run_prefetching(const LinearParams& p) {
  if (cpu::weights_prefetch_target() == PrefetchTo::kL2)
    return run<kPair, PrefetchTo::kL2, TX>(p);
  return run<kPair, PrefetchTo::kL1, TX>(p);
}

}  // namespace

bool linear_cpu_panels_avx512_takes(DType x, DType w) {
  if (x == DType::kFloat32 && w == DType::kFloat32) return true;
#if defined(__AVX512BF16__)
  if (x == DType::kBFloat16 && w == DType::kBFloat16) return true;
#endif
#if defined(__AVX512VNNI__)
  if (w == DType::kInt8 && (x == DType::kFloat32 || x == DType::kBFloat16)) return true;
#endif
  return false;
}

bool linear_cpu_panels_avx512(const LinearParams& p) {
  const DType x = p.x_dtype, w = p.w_dtype;
  if (x == DType::kFloat32 && w == DType::kFloat32) return run_prefetching<Pair::kFp32, float>(p);
#if defined(__AVX512BF16__)
  if (x == DType::kBFloat16 && w == DType::kBFloat16) return run_prefetching<Pair::kBf16, bf16_t>(p);
#endif
#if defined(__AVX512VNNI__)
  if (w == DType::kInt8) {
    if (x == DType::kFloat32) return run_prefetching<Pair::kInt8, float>(p);
    if (x == DType::kBFloat16) return run_prefetching<Pair::kInt8, bf16_t>(p);
  }
#endif
  return false;
}

}  // namespace cm3rt

#else  // no AVX-512 at build time

namespace cm3rt {
bool linear_cpu_panels_avx512_takes(DType, DType) { return false; }
bool linear_cpu_panels_avx512(const LinearParams&) { return false; }
}  // namespace cm3rt

#endif
