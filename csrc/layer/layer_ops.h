// Fused per-token math of a Chameleon layer on the CPU: RMSNorm (with the residual add
// before it), per-head qk LayerNorm + RoPE, and SwiGLU. A decode step runs each on a few rows,
// where the cost of a torch op is its dispatch, not its arithmetic: the unfused layer is
// ~50 torch ops, these are 4 calls.
//
// Rounding points are HF transformers' Chameleon (cm3rt/model/layers.py is the torch
// reference): statistics and rotations in fp32, a rounding to the activation dtype wherever
// HF rounds. Summation order differs from torch's, so fp32 agrees to a few ulps.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace cm3rt {

// out[t] = w * (x[t] / rms(x[t])) over H; with `residual`, first residual[t] += x[t] (in the
// activation dtype, HF's `hidden = residual + sublayer`), then the norm is of that sum.
struct RmsNormParams {
  const void* x;       // [T, H], row stride x_stride
  int64_t x_stride;
  void* residual;      // [T, H] contiguous, updated in place; nullptr: none
  const void* weight;  // [H]
  void* out;           // [T, H] contiguous
  DType dtype;         // of all of the above
  int T, H;
  float eps;
};
void rms_norm_cpu(const RmsNormParams& p);

// In place on the q and k heads of a fused qkv row ([T, (Hq + 2 Hkv) * D], q heads first,
// then k, then v): LayerNorm over D (fp32 statistics, no affine), rounded, times the head's
// gamma plus beta (each rounded), then RoPE (half split: pairs (i, i + D/2) rotated by
// position * inv_freq[i], in fp32, rounded once).
struct QkNormRopeParams {
  void* qkv;                 // [T, >= (Hq + Hkv) * D], row stride qkv_stride
  int64_t qkv_stride;
  const void* q_weight;      // [Hq, D]
  const void* q_bias;        // [Hq, D]
  const void* k_weight;      // [Hkv, D]
  const void* k_bias;        // [Hkv, D]
  const int64_t* positions;  // [T]
  const float* inv_freq;     // [D / 2]
  DType dtype;               // of qkv and the affine weights
  int T, Hq, Hkv, D;
  float eps;
};
void qk_norm_rope_cpu(const QkNormRopeParams& p);

// out[t, i] = silu(gate_up[t, i]) * gate_up[t, I + i] (silu rounded to the dtype first).
struct SwigluParams {
  const void* gate_up;  // [T, 2I], row stride gate_up_stride
  int64_t gate_up_stride;
  void* out;            // [T, I] contiguous
  DType dtype;
  int T, I;
};
void swiglu_cpu(const SwigluParams& p);

}  // namespace cm3rt
