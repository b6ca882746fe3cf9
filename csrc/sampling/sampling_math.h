// Per-token and per-group math of sample_logits, shared by the CPU and the CUDA kernels.
//
// The CPU and CUDA samplers must pick the same token for the same inputs, so every value that
// takes part in a decision (which tokens are kept, which token is drawn) is computed here with
// operations whose IEEE result is the same on both: explicit fmaf for every multiply-add (no
// compiler contraction decides it), exp/log of our own from fmaf polynomials (libm and CUDA
// differ in the last bit), no-FMA multiplies/adds on the device where contraction could fuse
// two roundings into one, and integer (fixed-point) sums of the probability mass, which are
// associative: any reduction order on any device gives the same bits.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/dtype.h"
#include "common/macros.h"

namespace cm3rt {

// Modes of the combine step (ops.sample_logits maps the names to these ids).
enum SampleMode : int32_t { kModeNone = 0, kModeCfg = 1, kModeCfg3 = 2, kModeCdk = 3 };
constexpr int kNumSampleModes = 4;

// Weights are exp(z - max) in [0, 1] quantised to multiples of 2^-40; sums stay below 2^63
// for vocabularies up to 2^23 tokens (checked by the bindings). A token whose weight is below
// 2^-40 of the best one's (log-ratio < -27.7) gets weight 0 and is never drawn.
constexpr int kWeightFracBits = 40;
constexpr float kWeightScale = 1099511627776.0f;  // 2^40
constexpr int64_t kMaxSampleVocab = int64_t(1) << 23;

// ---- no-contraction arithmetic ---------------------------------------------------------------
// nvcc fuses a multiply feeding an add into one FMA (one rounding); the CPU path stores the
// product first (two roundings). The _rn intrinsics are never fused, so both round twice.
CM3RT_HD float mul_rn(float a, float b) {
#if CM3RT_ON_DEVICE
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
CM3RT_HD float add_rn(float a, float b) {
#if CM3RT_ON_DEVICE
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// ---- order-preserving keys -------------------------------------------------------------------
// Maps floats to uint32 so that a < b  <=>  key(a) < key(b) (NaN excluded). -0 maps like +0,
// so ties in float compare are ties in key compare. key(-inf) = 0x007FFFFF is below every
// finite key.
CM3RT_HD uint32_t float_key(float f) {
  uint32_t u = float_bits(f);
  u = (u == 0x80000000u) ? 0u : u;
  // sign set: flip all bits; else set the sign bit (branch-free, so CPU loops vectorise)
  return u ^ (uint32_t(int32_t(u) >> 31) | 0x80000000u);
}
CM3RT_HD float key_float(uint32_t k) {
  return bits_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}
constexpr uint32_t kKeyNegInf = 0x007FFFFFu;

// ---- deterministic exp / log -----------------------------------------------------------------
// exp(x) for x <= 0 (Cody-Waite reduction, degree-6 polynomial; max rel. error ~2 ulp).
// x < -87 (including -inf) and NaN give 0.
CM3RT_HD float exp_nonpos(float x) {
  const bool under = !(x >= -87.0f);
  x = under ? -87.0f : x;  // select, not branch: CPU loops over it vectorise
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = fmaf(x, 1.44269504088896341f, magic) - magic;
  float r = fmaf(n, -0.693359375f, x);
  r = fmaf(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fmaf(p, r, 1.3981999507e-3f);
  p = fmaf(p, r, 8.3334519073e-3f);
  p = fmaf(p, r, 4.1665795894e-2f);
  p = fmaf(p, r, 1.6666665459e-1f);
  p = fmaf(p, r, 5.0000001201e-1f);
  const float r2 = mul_rn(r, r);
  p = fmaf(p, r2, r);
  p = add_rn(p, 1.0f);
  const int e = int(n) + 127;  // n in [-126, 0]: a normal power of two
  const float y = mul_rn(p, bits_float(uint32_t(e) << 23));
  return under ? 0.0f : y;
}

// log(x) for x > 0 finite (Cephes logf polynomial; max rel. error ~2 ulp). 0 -> -inf.
CM3RT_HD float log_pos(float x) {
  if (x == 0.0f) return -INFINITY;
  if (!(x > 0.0f) || x == INFINITY) return x == INFINITY ? INFINITY : NAN;
  int e = 0;
  uint32_t u = float_bits(x);
  if ((u & 0x7f800000u) == 0) {  // subnormal: scale into the normal range
    x = mul_rn(x, 16777216.0f);
    u = float_bits(x);
    e = -24;
  }
  e += int((u >> 23) & 0xffu) - 126;
  float m = bits_float((u & 0x007fffffu) | 0x3f000000u);  // in [0.5, 1)
  if (m < 0.707106781186547524f) {
    e -= 1;
    m = add_rn(m, m);
  }
  const float f = m - 1.0f;
  const float z = mul_rn(f, f);
  float y = 7.0376836292e-2f;
  y = fmaf(y, f, -1.1514610310e-1f);
  y = fmaf(y, f, 1.1676998740e-1f);
  y = fmaf(y, f, -1.2420140846e-1f);
  y = fmaf(y, f, 1.4249322787e-1f);
  y = fmaf(y, f, -1.6668057665e-1f);
  y = fmaf(y, f, 2.0000714765e-1f);
  y = fmaf(y, f, -2.4999993993e-1f);
  y = fmaf(y, f, 3.3333331174e-1f);
  y = mul_rn(mul_rn(y, f), z);  // f^3 * P(f)
  const float fe = float(e);
  y = fmaf(fe, -2.12194440e-4f, y);
  y = fmaf(z, -0.5f, y);
  const float r = add_rn(f, y);
  return fmaf(fe, 0.693359375f, r);
}

// Fixed-point weight of a token: floor(w * 2^40) for w = exp(z - max) in [0, 1] (the product
// is exact; the value fits int64, whose conversion is one instruction on the CPU).
CM3RT_HD uint64_t weight_fixed(float w) { return uint64_t(int64_t(mul_rn(w, kWeightScale))); }

// ---- inputs ----------------------------------------------------------------------------------
CM3RT_HD bool is_nan_or_posinf(float x) { return (x != x) | (x == INFINITY); }

// Allowed-token test; either mask may be absent (nullptr).
CM3RT_HD bool token_allowed(const uint8_t* allowed_row, const uint32_t* bits_row, int t) {
  if (allowed_row && !allowed_row[t]) return false;
  if (bits_row && !((bits_row[t >> 5] >> (t & 31)) & 1u)) return false;
  return true;
}

// Per-group settings, resolved from scalars or [G] tensors (see SampleLogitsParams).
struct GroupConfig {
  int32_t mode;
  int32_t streams;
  float temperature;
  int32_t top_k;
  float top_p;
  float cfg_scale;        // s_txt
  float cfg_image_scale;  // s_img (cfg3)
  float cd_alpha;
  int32_t cd_k;
  uint64_t seed;
  uint64_t step;
};

// Number of input rows a mode reads (cond, [image-cond,] uncond).
CM3RT_HD int rows_used(int32_t mode) {
  return mode == kModeCfg3 ? 3 : (mode == kModeNone ? 1 : 2);
}

// Everything the kernels rely on; the bindings raise a descriptive error for each case before
// a CPU call (and before a CUDA call with validate=True). A CUDA group that fails it anyway is
// flagged (token -1, logprob NaN) instead of read out of range.
CM3RT_HD bool group_config_valid(const GroupConfig& c) {
  if (c.mode < 0 || c.mode >= kNumSampleModes) return false;
  if (c.streams < 1 || c.streams > 3) return false;
  if (c.mode == kModeNone ? c.streams < 1 : c.streams != rows_used(c.mode)) return false;
  if (!(c.temperature >= 0.0f) || c.temperature == INFINITY) return false;
  if (c.top_k < 0) return false;
  if (!(c.top_p > 0.0f && c.top_p <= 1.0f)) return false;
  const bool cfg = c.mode == kModeCfg || c.mode == kModeCfg3;
  if (cfg && !(fabsf(c.cfg_scale) < INFINITY)) return false;
  if (c.mode == kModeCfg3 && !(fabsf(c.cfg_image_scale) < INFINITY)) return false;
  if (c.mode == kModeCdk && (!(c.cd_alpha >= 0.0f && c.cd_alpha <= 1.0f) || c.cd_k < 1))
    return false;
  return true;
}

// ---- steps 1-3 of the contract for one token -------------------------------------------------
// The scaled combined logit z of a token (z = combine(...) / T; T == 0 uses 1, for argmax), or
// -inf when the token is not allowed, when any row the mode reads holds -inf for it, or when
// cdk's plausibility filter drops it (c < cd_min, cd_min = -inf when cdk is off). A NaN or
// +inf input, or a combined value that overflows to +inf / NaN, sets `bad` (the group is then
// flagged; the value returned is -inf).
CM3RT_HD float token_score(int32_t mode, float c, float i, float u, float s_txt, float s_img,
                           float cd_min, float inv_t, bool& bad) {
  // Selects and bitwise |, & rather than early returns and short-circuits: the CPU kernel
  // instantiates it per mode inside `omp simd` loops, which then vectorise.
  const bool use_u = mode != kModeNone, use_i = mode == kModeCfg3;
  const bool bad_in = is_nan_or_posinf(c) | (use_u & is_nan_or_posinf(u)) |
                      (use_i & is_nan_or_posinf(i));
  bool drop = (c == -INFINITY) | (use_u & (u == -INFINITY)) | (use_i & (i == -INFINITY));
  float l = c;
  if (mode == kModeCfg) l = fmaf(s_txt, c - u, u);
  if (mode == kModeCfg3) l = fmaf(s_txt, c - i, fmaf(s_img, i - u, u));
  if (mode == kModeCdk) {
    drop = drop | !(c >= cd_min);
    l = c - u;
  }
  const float z = mul_rn(l, inv_t);
  const bool b = bad_in | (!drop & is_nan_or_posinf(z));
  bad = bad | b;
  return (drop | b) ? -INFINITY : z;
}

// cdk's keep rule p_e(t) >= alpha * p_e(k-th) in logit form: c_t >= c_(k) + log(alpha)
// (log_softmax shifts every token of c by the same constant).
CM3RT_HD float cdk_min_logit(float c_kth, float alpha) {
  return alpha > 0.0f ? add_rn(c_kth, log_pos(alpha)) : -INFINITY;
}

// ---- radix threshold search (top-k by counts, top-p by mass) ---------------------------------
// Both filters keep the tokens whose key v satisfies S(> v) < P, where S sums the weights
// (1 for top-k, the fixed-point mass for top-p) of the candidate tokens with a larger key:
// top-k keeps v iff fewer than k tokens beat it, top-p iff the mass strictly before it is
// below p * Z. S(> v) grows as v falls, so the kept keys are an upper set whose lowest member
// is found digit by digit (8 bits at a time, most significant first): at each level the
// chosen bucket is the lowest non-empty one whose mass above it is below P. Ties are kept
// together. Exact (integer weights), so every reduction order agrees.
constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;
constexpr int kRadixPasses = 32 / kRadixBits;

struct RadixState {
  uint32_t prefix;  // key bits fixed so far
  uint32_t mask;    // which bits of the key are fixed
  uint64_t above;   // weight of candidates whose key is above the prefix's range
  uint64_t at;      // after the last pass: weight of the candidates whose key == prefix
};

CM3RT_HD RadixState radix_init() { return RadixState{0u, 0u, 0u, 0u}; }
CM3RT_HD int radix_shift(int pass) { return 32 - kRadixBits * (pass + 1); }
CM3RT_HD bool radix_matches(const RadixState& s, uint32_t key) { return (key & s.mask) == s.prefix; }
CM3RT_HD int radix_bin(uint32_t key, int pass) {
  return int((key >> radix_shift(pass)) & uint32_t(kRadixBins - 1));
}

// Serial bucket choice over a finished histogram (the CUDA kernel computes the same choice
// with a warp scan). Returns false when no bucket qualifies (no candidates at all).
CM3RT_HD bool radix_choose(RadixState& s, const uint64_t* hist, double limit, int pass) {
  uint64_t cum = s.above;
  int chosen = -1;
  uint64_t chosen_above = 0;
  for (int b = kRadixBins - 1; b >= 0; --b) {
    if (hist[b] == 0) continue;
    if (!(double(cum) < limit)) break;
    chosen = b;
    chosen_above = cum;
    cum += hist[b];
  }
  if (chosen < 0) return false;
  const int shift = radix_shift(pass);
  s.prefix |= uint32_t(chosen) << shift;
  s.mask |= uint32_t(kRadixBins - 1) << shift;
  s.above = chosen_above;
  s.at = hist[chosen];
  return true;
}

}  // namespace cm3rt
