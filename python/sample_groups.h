// The sampler's per-group arguments as host arrays, and their check: shared by the
// sample_logits binding and CpuDecoder.step_sample (whose groups come packed in the
// engine's step buffers), so both reject the same bad groups with the same messages.
#pragma once

#include <cstdint>
#include <string>

namespace cm3rt::py_binding {

// G values each, on the host.
struct SampleGroupsView {
  const int32_t* streams;
  const int32_t* mode;
  const float* temperature;
  const int32_t* top_k;
  const float* top_p;
  const float* cfg_scale;
  const float* cfg_image_scale;
  const float* cd_alpha;
  const int32_t* cd_k;
};

// Which arguments the caller passed per group ([G] tensors: messages name 'arg'[g]) rather
// than as one number.
struct SampleGroupNames {
  bool streams, mode, temperature, top_k, top_p, cfg_scale, cfg_image_scale, cd_alpha, cd_k;
};

// ValueError (via fail_value) naming the first bad group argument of `op`; the stream counts
// must sum to R rows.
void check_sample_groups(const std::string& op, int G, int64_t R, const SampleGroupsView& v,
                         const SampleGroupNames& per_group);

}  // namespace cm3rt::py_binding
