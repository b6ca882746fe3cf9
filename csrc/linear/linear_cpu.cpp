// CPU weight-streaming linear (see linear.h): the dispatch to the AMX, AVX-512 and AVX2 kernels
// (linear_cpu_amx.cpp, linear_cpu_avx512.cpp, linear_cpu_panels_avx512.cpp,
// linear_cpu_panels_avx2.cpp) and the portable
// loops (the 8-lane [N, K] kernel and panels_impl for packed weights), used where
// the build has neither or set_linear_cpu_kernel caps it. Portable: OpenMP over blocks of 4
// output channels; each block streams its 4 weight rows through L1 in chunks of kChunk
// elements while every row of x is multiplied against them (8 fp32 accumulators: 4 channels
// x 2 rows), so each weight byte is read from memory once per call. Partial sums of a chunk
// land in a per-thread [M, 4] buffer; the last chunk applies the scale and writes out.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <vector>

#include "cpu/vec.h"
#include "linear/linear.h"
#include "linear/linear_cpu_amx.h"
#include "linear/linear_cpu_avx512.h"
#include "linear/linear_cpu_panels_avx2.h"

namespace cm3rt {

namespace {

using cpu::v8f;

constexpr int kChannels = 4;    // output channels per block (weight rows in flight)
constexpr int kChunk = 512;     // K elements per pass: 4 rows x 512 x 4 B = 8 KiB (L1)

inline float loadw(const float* p) { return *p; }
inline float loadw(const bf16_t* p) { return to_float(*p); }
inline float loadw(const int8_t* p) { return float(*p); }
inline float loadx(const float* p) { return *p; }
inline float loadx(const bf16_t* p) { return to_float(*p); }
inline void store_out(float* p, float v) { *p = v; }
inline void store_out(bf16_t* p, float v) { *p = from_float<bf16_t>(v); }

// Dot products of rows m0 (and m0 + 1 when two) of x with weight rows w[0..nc) over
// k in [k0, k1); adds into acc[m * kChannels + c].
template <typename TX, typename TW>
void chunk_dots(const TX* x0, const TX* x1, const TW* const* w, int nc, int k0, int k1,
                float* acc0, float* acc1) {
  v8f a[2][kChannels];
  for (int c = 0; c < kChannels; ++c) a[0][c] = a[1][c] = cpu::splat8(0.0f);
  int k = k0;
  for (; k + 8 <= k1; k += 8) {
    const v8f xa = cpu::load8(x0 + k);
    const v8f xb = x1 ? cpu::load8(x1 + k) : xa;
    for (int c = 0; c < kChannels; ++c) {
      if (c >= nc) break;
      const v8f wv = cpu::load8(w[c] + k);
      a[0][c] += xa * wv;
      a[1][c] += xb * wv;
    }
  }
  for (int c = 0; c < nc; ++c) {
    float s0 = cpu::hsum8(a[0][c]), s1 = cpu::hsum8(a[1][c]);
    for (int kk = k; kk < k1; ++kk) {
      const float wv = loadw(w[c] + kk);
      s0 += loadx(x0 + kk) * wv;
      if (x1) s1 += loadx(x1 + kk) * wv;
    }
    acc0[c] += s0;
    if (x1) acc1[c] += s1;
  }
}

template <typename TX, typename TW>
void linear_impl(const LinearParams& p) {
  const TX* x = static_cast<const TX*>(p.x);
  const TW* w = static_cast<const TW*>(p.w);
  TX* out = static_cast<TX*>(p.out);
  const int blocks = (p.N + kChannels - 1) / kChannels;
#pragma omp parallel
  {
    std::vector<float> acc(size_t(p.M) * kChannels);
#pragma omp for schedule(static)
    for (int b = 0; b < blocks; ++b) {
      const int n0 = b * kChannels, nc = std::min(kChannels, p.N - n0);
      const TW* rows[kChannels];
      for (int c = 0; c < kChannels; ++c) rows[c] = w + int64_t(n0 + std::min(c, nc - 1)) * p.w_stride;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int k0 = 0; k0 < p.K; k0 += kChunk) {
        const int k1 = std::min(p.K, k0 + kChunk);
        for (int m = 0; m < p.M; m += 2) {
          const TX* x0 = x + int64_t(m) * p.x_stride;
          const TX* x1 = m + 1 < p.M ? x0 + p.x_stride : nullptr;
          chunk_dots(x0, x1, rows, nc, k0, k1, &acc[size_t(m) * kChannels],
                     &acc[size_t(m + (x1 ? 1 : 0)) * kChannels]);
        }
      }
      for (int m = 0; m < p.M; ++m)
        for (int c = 0; c < nc; ++c) {
          const float s = p.scales ? p.scales[n0 + c] : 1.0f;
          store_out(out + int64_t(m) * p.out_stride + n0 + c, acc[size_t(m) * kChannels + c] * s);
        }
    }
  }
}

// Packed weights (panels, linear.h), portable: each panel of 16 channels is read once and
// every row of x is multiplied against it, 16 fp32 accumulators per row, in the order the
// panel stores K (so the compiler vectorises over the 16 channels).
template <typename TX, typename TW>
void panels_impl(const LinearParams& p) {
  const TX* x = static_cast<const TX*>(p.x);
  const TW* w = static_cast<const TW*>(p.w);
  TX* out = static_cast<TX*>(p.out);
  const int g = panel_group(p.w_dtype), Kg = (p.K + g - 1) / g;
  const int panels = (p.N + kPanelChannels - 1) / kPanelChannels;
  const int64_t panel_elems = int64_t(Kg) * kPanelChannels * g;
#pragma omp parallel for schedule(static)
  for (int pi = 0; pi < panels; ++pi) {
    const TW* panel = w + pi * panel_elems;
    const int n0 = pi * kPanelChannels, nc = std::min(kPanelChannels, p.N - n0);
    for (int m = 0; m < p.M; ++m) {
      const TX* row = x + int64_t(m) * p.x_stride;
      float acc[kPanelChannels] = {};
      for (int kk = 0; kk < Kg; ++kk) {
        const TW* step = panel + int64_t(kk) * kPanelChannels * g;
        for (int i = 0; i < g; ++i) {
          const int k = g * kk + i;
          if (k >= p.K) break;
          const float xv = loadx(row + k);
          for (int c = 0; c < kPanelChannels; ++c) acc[c] += xv * loadw(step + c * g + i);
        }
      }
      for (int c = 0; c < nc; ++c) {
        const float s = p.scales ? p.scales[n0 + c] : 1.0f;
        store_out(out + int64_t(m) * p.out_stride + n0 + c, acc[c] * s);
      }
    }
  }
}

template <typename TX>
void dispatch_weights(const LinearParams& p) {
  if (p.w_packed) {
    switch (p.w_dtype) {
      case DType::kFloat32: return panels_impl<TX, float>(p);
      case DType::kBFloat16: return panels_impl<TX, bf16_t>(p);
      case DType::kInt8: return panels_impl<TX, int8_t>(p);
      default: break;
    }
    throw std::invalid_argument("linear_cpu: unsupported weight dtype");
  }
  switch (p.w_dtype) {
    case DType::kFloat32: return linear_impl<TX, float>(p);
    case DType::kBFloat16: return linear_impl<TX, bf16_t>(p);
    case DType::kInt8: return linear_impl<TX, int8_t>(p);
    default: break;
  }
  throw std::invalid_argument("linear_cpu: unsupported weight dtype");
}

// Levels set_linear_cpu_kernel caps at. "avx2" names the AVX2 panel kernel; on [N, K]
// weights it is the 8-lane loop, as "portable" (which -march=native compiles to AVX2).
enum Kernel : int { kAmx = 0, kAvx512 = 1, kAvx2 = 2, kPortable = 3 };
std::atomic<int> g_best_allowed{kAmx};

}  // namespace

std::vector<std::string> linear_cpu_kernels() {
  std::vector<std::string> names;
  if (linear_cpu_amx_available()) names.push_back("amx");
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  names.push_back("avx512");
#endif
#if defined(__AVX2__) && defined(__FMA__)
  names.push_back("avx2");
#endif
  names.push_back("portable");
  return names;
}

std::vector<std::string> linear_cpu_packed_fast_pairs() {
  std::vector<std::string> pairs;
  for (DType x : {DType::kFloat32, DType::kBFloat16})
    for (DType w : {DType::kFloat32, DType::kBFloat16, DType::kInt8})
      if (linear_cpu_panels_avx512_takes(x, w) || linear_cpu_panels_avx2_takes(x, w))
        pairs.push_back(std::string(dtype_name(x)) + "/" + dtype_name(w));
  return pairs;
}

void set_linear_cpu_kernel(const std::string& name) {
  if (name.empty()) { g_best_allowed = kAmx; return; }
  const auto names = linear_cpu_kernels();
  if (std::find(names.begin(), names.end(), name) == names.end()) {
    std::string have;
    for (const auto& n : names) have += (have.empty() ? "" : ", ") + n;
    throw std::invalid_argument("set_linear_cpu_kernel: no CPU kernel '" + name +
                                "' here (this machine has: " + have + ")");
  }
  g_best_allowed = name == "amx" ? kAmx : name == "avx512" ? kAvx512
                 : name == "avx2" ? kAvx2 : kPortable;
}

void linear_cpu(const LinearParams& p) {
  if (p.M == 0 || p.N == 0) return;
  const int best = g_best_allowed;
  if (p.w_packed) {  // AMX tiles want their own layout: panels go to AVX-512, AVX2 or portable
    if (best <= kAvx512 && linear_cpu_panels_avx512(p)) return;
    if (best <= kAvx2 && linear_cpu_panels_avx2(p)) return;
  } else {
    if (best <= kAmx && linear_cpu_amx(p)) return;
    if (best <= kAvx512 && linear_cpu_avx512(p)) return;
  }
  if (p.x_dtype == DType::kFloat32) return dispatch_weights<float>(p);
  if (p.x_dtype == DType::kBFloat16) return dispatch_weights<bf16_t>(p);
  throw std::invalid_argument("linear_cpu: unsupported activation dtype");
}

}  // namespace cm3rt
