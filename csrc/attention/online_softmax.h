// Online-softmax state shared by the CPU and CUDA attention kernels.
//
// A row's running state is (m, l): the max scaled score seen so far and the sum of
// exp(score - m). The output accumulator acc holds sum_j exp(s_j - m) * v_j. Adding a tile
// of scores rescales by exp(m_old - m_new); merging two partial states (split-KV) uses the
// same rule. Empty rows keep m = -inf; every function is safe for them (no inf - inf NaNs).
#pragma once

#include <cmath>

#include "common/macros.h"

namespace cm3rt {

struct SoftmaxState {
  float m;  // running max of scaled scores (-inf: nothing seen)
  float l;  // running sum of exp(score - m)
};

CM3RT_HD SoftmaxState softmax_state_init() { return {-INFINITY, 0.0f}; }

CM3RT_HD float safe_exp(float x) {
#if CM3RT_ON_DEVICE
  return __expf(x);
#else
  return std::exp(x);
#endif
}

// Rescale factor for the old accumulator after seeing a tile whose max is tile_max.
// Updates st.m; returns exp(m_old - m_new) (1 when nothing changes, 0 from an empty state).
CM3RT_HD float softmax_update_max(SoftmaxState& st, float tile_max) {
  const float m_new = tile_max > st.m ? tile_max : st.m;
  const float alpha = (st.m == -INFINITY) ? (m_new == -INFINITY ? 1.0f : 0.0f)
                                          : safe_exp(st.m - m_new);
  st.m = m_new;
  st.l *= alpha;
  return alpha;
}

// exp(score - m) for a score of the current tile after softmax_update_max; 0 for masked.
CM3RT_HD float softmax_weight(const SoftmaxState& st, float score) {
  return (score == -INFINITY) ? 0.0f : safe_exp(score - st.m);
}

// Final normaliser 1/l (0 for an empty row, whose output is defined as 0).
CM3RT_HD float softmax_inv_sum(const SoftmaxState& st) { return st.l > 0.0f ? 1.0f / st.l : 0.0f; }

// Natural-log LSE of the row: m + log(l), -inf for an empty row.
CM3RT_HD float softmax_lse(const SoftmaxState& st) {
  return st.l > 0.0f ? st.m + logf(st.l) : -INFINITY;
}

// Merge weights for combining normalised partial outputs o_a (lse_a), o_b (lse_b):
// o = w_a * o_a + w_b * o_b, lse = max + log(sum). Returns the merged lse.
CM3RT_HD float lse_merge_weights(float lse_a, float lse_b, float& w_a, float& w_b) {
  const float m = lse_a > lse_b ? lse_a : lse_b;
  if (m == -INFINITY) { w_a = 0.0f; w_b = 0.0f; return -INFINITY; }
  const float ea = safe_exp(lse_a - m), eb = safe_exp(lse_b - m);
  const float s = ea + eb;
  w_a = ea / s;
  w_b = eb / s;
  return m + logf(s);
}

// Causal limit: number of keys query row i (0-based within its sequence) may attend.
CM3RT_HD int causal_key_count(int seq_len, int q_len, int i, bool causal) {
  if (!causal) return seq_len;
  const int n = seq_len - q_len + i + 1;
  return n < 0 ? 0 : (n > seq_len ? seq_len : n);
}

}  // namespace cm3rt
