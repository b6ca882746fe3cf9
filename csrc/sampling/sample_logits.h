// sample_logits: one fused op per decode step that turns the logits of every stream of every
// group into one token per group (docs/DESIGN.md "Kernel contracts", steps 1-6).
//
// Per group g (rows row0 .. row0 + S - 1 of `logits`, S = streams of g):
//   1. tokens outside the allowed set -> -inf in every stream;
//   2. combine: none l = c; cfg l = u + s*(c - u); cfg3 l = u + s_img*(i - u) + s_txt*(c - i);
//      cdk l = c - u on tokens with c >= c_(k) + log(alpha), -inf elsewhere;
//   3. z = l / T (T == 0: token = argmax l, lowest id on ties, logprob 0);
//   4. top-k (k > 0): keep z >= the k-th largest z (ties kept);
//   5. top-p (p < 1): keep z whose mass strictly above it is < p (ties kept together);
//   6. draw from the renormalised kept set by inverse CDF over token ids in id order, with a
//      single 64-bit uniform from Philox4x32-10 keyed by (seed, step): the same inputs give the
//      same token on any batch layout and on CPU and CUDA alike.
// logprob = log p(token) under the final distribution. A group with no allowed finite token,
// a NaN or +inf input in a row it reads, or (CUDA without validation) invalid settings gets
// token -1 and logprob NaN; other groups of the batch are unaffected.
//
// Nothing [G, V]-sized is ever written: the CPU works row by row in a per-thread row buffer
// (L2-resident), the CUDA kernel re-reads the input rows (one thread block per group).
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/macros.h"
#include "sampling/sampling_math.h"

namespace cm3rt {

// A per-group setting: values[g] when values != nullptr (a [G] tensor on the device of the
// logits), else the scalar.
template <typename T>
struct PerGroup {
  const T* values;
  T scalar;
  CM3RT_HD T at(int g) const { return values ? values[g] : scalar; }
};

struct SampleLogitsParams {
  const void* logits;          // [R, V], last dim contiguous, rows of a group adjacent
  int64_t row_stride;          // elements between consecutive rows
  DType dtype;                 // float32, float16, bfloat16
  int R, V, G;
  PerGroup<int32_t> streams;   // rows per group, 1..3
  PerGroup<int32_t> mode;      // SampleMode
  PerGroup<float> temperature;
  PerGroup<int32_t> top_k;
  PerGroup<float> top_p;
  PerGroup<float> cfg_scale;
  PerGroup<float> cfg_image_scale;
  PerGroup<float> cd_alpha;
  PerGroup<int32_t> cd_k;
  PerGroup<int64_t> seed;
  PerGroup<int64_t> step;
  const uint8_t* allowed;      // bool [V] (stride 0) or [G, V] (stride = row stride); or null
  int64_t allowed_stride;
  const uint32_t* allowed_bits;  // [ceil(V/32)] (stride 0) or [G, ceil(V/32)]; or null
  int64_t allowed_bits_stride;
  int64_t* tokens;             // [G] out
  float* logprobs;             // [G] out
};

CM3RT_HD GroupConfig group_config(const SampleLogitsParams& p, int g) {
  GroupConfig c;
  c.mode = p.mode.at(g);
  c.streams = p.streams.at(g);
  c.temperature = p.temperature.at(g);
  c.top_k = p.top_k.at(g);
  c.top_p = p.top_p.at(g);
  c.cfg_scale = p.cfg_scale.at(g);
  c.cfg_image_scale = p.cfg_image_scale.at(g);
  c.cd_alpha = p.cd_alpha.at(g);
  c.cd_k = p.cd_k.at(g);
  c.seed = uint64_t(p.seed.at(g));
  c.step = uint64_t(p.step.at(g));
  return c;
}

// Philox lane of the draw (other lanes are free for future per-group randomness).
constexpr uint32_t kSampleDrawLane = 0;

void sample_logits_cpu(const SampleLogitsParams& p);
void sample_logits_cuda(const SampleLogitsParams& p, void* stream);

}  // namespace cm3rt
