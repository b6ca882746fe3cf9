// Host-side launch planning of the CUDA paged attention (see paged_attention_plan.h).
#include "attention/paged_attention_plan.h"

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "attention/paged_attention.h"

namespace cm3rt {

namespace attn_plan {

int effective_max_q_len(int T, int max_q_len) {
  return (max_q_len > 0 && max_q_len < T) ? max_q_len : T;
}

DecodePlan plan_decode(int B, int H, int Hkv, int D, int max_seq_len, int sm_count) {
  DecodePlan plan{1, 1, 0, 0};
  if (B <= 0 || H <= 0 || Hkv <= 0 || D <= 0) return plan;
  const int group = H / Hkv;
  plan.head_chunks = std::max(1, (group + kDecodeMaxHeads - 1) / kDecodeMaxHeads);
  if (sm_count <= 0 || max_seq_len <= kDecodeMinKeysPerSplit) return plan;
  const int64_t ctas = int64_t(B) * Hkv * plan.head_chunks;
  const int64_t target = int64_t(kDecodeCtasPerSm) * sm_count;
  if (ctas >= target) return plan;
  const int64_t by_occupancy = (target + ctas - 1) / ctas;
  const int64_t by_length = (int64_t(max_seq_len) + kDecodeMinKeysPerSplit - 1) / kDecodeMinKeysPerSplit;
  const int splits = int(std::min<int64_t>({by_occupancy, by_length, kDecodeMaxSplits}));
  if (splits <= 1) return plan;
  plan.splits = splits;
  const size_t rows = size_t(splits) * size_t(B) * size_t(H);  // (split, sequence, head)
  plan.lse_offset = rows * size_t(D) * sizeof(float);
  plan.workspace_bytes = plan.lse_offset + rows * sizeof(float);
  return plan;
}

}  // namespace attn_plan

namespace {

void require_non_negative(const char* name, int v) {
  if (v < 0)
    throw std::invalid_argument(std::string("paged_attention_workspace_bytes: argument '") + name +
                                "' must be >= 0, got " + std::to_string(v));
}

}  // namespace

// The decode plan depends on the kv-head count, which this signature does not carry; the
// plan uses more splits the fewer CTAs there are, so the bytes returned are the maximum over
// every Hkv that divides H. Any call with these shapes then finds its workspace large enough.
size_t paged_attention_workspace_bytes(int T, int B, int H, int D, int max_q_len,
                                       int max_seq_len, int device_sm_count) {
  require_non_negative("T", T);
  require_non_negative("B", B);
  require_non_negative("H", H);
  require_non_negative("D", D);
  if (T == 0 || B == 0 || H == 0 || D == 0) return 0;
  if (attn_plan::effective_max_q_len(T, max_q_len) != 1) return 0;  // prefill kernels: no scratch
  size_t bytes = 0;
  for (int hkv = 1; hkv <= H; ++hkv)
    if (H % hkv == 0)
      bytes = std::max(bytes, attn_plan::plan_decode(B, H, hkv, D, max_seq_len, device_sm_count)
                                  .workspace_bytes);
  return bytes;
}

}  // namespace cm3rt
