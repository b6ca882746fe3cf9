// One whole forward step of a Chameleon decoder on the CPU, in C++: embeddings, every layer
// (RMSNorm, QKV projection, qk norm + RoPE, kv_append, paged attention, output projection,
// RMSNorm, gate/up projection, SwiGLU, down projection) and the logits of the sampling rows.
//
// Why: a decode step multiplies a few rows by each weight matrix, so its arithmetic is a
// weight read; driven from Python, each of a layer's ~10 kernel calls also pays a few
// microseconds of dispatch, argument conversion and view slicing, which on a small model is
// most of the step. This runs the same kernels (linear_cpu, rms_norm_cpu, qk_norm_rope_cpu,
// kv_append_cpu, paged_attention_cpu, swiglu_cpu) in the same order on the same buffers as
// cm3rt/model/chameleon.py's CPU path (ChameleonDecoderLayer.forward_cpu), so its logits are
// bit-identical to that path's whenever that path sends every projection to linear_cpu
// (cm3rt.model.chameleon.project decides; the caller checks).
//
// Nothing here allocates: scratch comes from the caller (decoder_step_scratch_bytes).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/dtype.h"

namespace cm3rt {

// A projection's weight [N, K] (contiguous) in float32 / bfloat16, or int8 with float32
// per-output-channel scales [N]; with its panels (linear.h) where the model packed it, which
// the step then multiplies instead.
struct ProjectionWeight {
  const void* w = nullptr;
  DType dtype = DType::kFloat32;
  const float* scales = nullptr;  // int8 only
  const void* packed = nullptr;   // [ceil(N / 16), ceil(K / g), 16 g] or nullptr
  int N = 0, K = 0;
};

struct DecoderLayerWeights {
  const void* input_norm;          // [H]
  const void* post_norm;           // [H]
  ProjectionWeight qkv;            // [(Hq + 2 Hkv) D, H], rows q; k; v
  const void* q_norm_weight;       // [Hq, D]
  const void* q_norm_bias;         // [Hq, D]
  const void* k_norm_weight;       // [Hkv, D]
  const void* k_norm_bias;         // [Hkv, D]
  ProjectionWeight o;              // [H, Hq D]
  ProjectionWeight gate_up;        // [2 I, H], rows gate; up
  ProjectionWeight down;           // [H, I]
  void* k_cache;                   // [NB, BS, Hkv, D] contiguous, activation dtype
  void* v_cache;
};

struct DecoderWeights {
  DType dtype;                     // activations, norms, embeddings, KV cache: f32 or bf16
  int H, Hq, Hkv, D, I;            // hidden, q heads, kv heads, head dim, MLP channels
  int vocab_rows;                  // rows of the embedding table
  int NB, BS;                      // KV-cache blocks and block size
  float rms_eps, qk_eps;
  bool swin_norm;                  // norms after the sublayers (Chameleon-30B layout)
  const void* embed;               // [vocab_rows, H]
  const void* final_norm;          // [H]
  const float* inv_freq;           // [D / 2]
  std::vector<DecoderLayerWeights> layers;
  std::vector<ProjectionWeight> heads;  // logit heads [V_h, H] (full lm_head, image rows, ...)
};

// The step's packed tokens, as the engine lays them out (cm3rt/engine/step_inputs.py).
struct DecoderStepInputs {
  const int64_t* ids;              // [T]
  const int64_t* positions;        // [T]
  const int32_t* slots;            // [T]
  const int32_t* block_tables;     // [B, MB] contiguous
  const int32_t* seq_lens;         // [B]
  const int32_t* cu_seqlens_q;     // [B + 1]
  const int64_t* rows;             // [R] packed tokens whose logits are wanted
  int T, B, MB, R;
  int max_q_len, max_seq_len;
  int head;                        // index into DecoderWeights::heads (R > 0)
  float* logits;                   // [R, heads[head].N] float32 contiguous
};

// Throws std::invalid_argument naming the first inconsistent field (ids outside the
// embedding table, slots or block ids outside the cache, lengths that do not add up, rows
// outside [0, T), a head that does not exist). O(T + B * MB): cheap next to a step.
void validate_decoder_step(const DecoderWeights& w, const DecoderStepInputs& s);
// Bytes of scratch a step of T tokens and R logit rows with head `head` needs.
size_t decoder_step_scratch_bytes(const DecoderWeights& w, int T, int R, int head);
void decoder_step_cpu(const DecoderWeights& w, const DecoderStepInputs& s, void* scratch,
                      size_t scratch_bytes);

}  // namespace cm3rt
