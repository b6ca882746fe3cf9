// The whole-step CPU decoder (see decoder_cpu.h): the kernels of one forward step, called
// in the order and on the buffers of the Python CPU path, so the two agree bit for bit.
#include "model/decoder_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

#include "attention/kv_append.h"
#include "attention/paged_attention.h"
#include "layer/layer_ops.h"
#include "linear/linear.h"

namespace cm3rt {

namespace {

[[noreturn]] void fail(const std::string& msg) {
  throw std::invalid_argument("decoder_step: " + msg);
}

constexpr size_t kAlign = 64;
size_t aligned(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// The step's activation buffers, cut from the caller's scratch (all [rows, width] in the
// activation dtype, contiguous).
struct Buffers {
  char* residual;  // [T, H]   the residual stream (swin: the whole state)
  char* delta;     // [T, H]   the last sublayer's output, not yet added
  char* normed;    // [T, H]   a norm's output, the next projection's input
  char* qkv;       // [T, (Hq + 2 Hkv) D]
  char* attn;      // [T, Hq D]
  char* gate_up;   // [T, 2 I]
  char* act;       // [T, I]
  char* rows_res;  // [R, H]   final rows: residual, delta, normed
  char* rows_delta;
  char* rows_normed;
  char* head_out;  // [R, V_h] (bfloat16 models: the logits before widening)
};

// Cuts the buffers of a step of T tokens and R logit rows through `head` from `base`, each
// 64-byte aligned, and returns the bytes they take (base nullptr: only counts them).
size_t cut_buffers(const DecoderWeights& w, int T, int R, int head, char* base, Buffers& b) {
  const size_t e = size_t(dtype_size(w.dtype));
  const size_t head_rows = head >= 0 && head < int(w.heads.size()) ? w.heads[head].N : 0;
  const std::pair<char**, size_t> parts[] = {
      {&b.residual, size_t(T) * w.H}, {&b.delta, size_t(T) * w.H},
      {&b.normed, size_t(T) * w.H}, {&b.qkv, size_t(T) * (w.Hq + 2 * w.Hkv) * w.D},
      {&b.attn, size_t(T) * w.Hq * w.D}, {&b.gate_up, size_t(T) * 2 * w.I},
      {&b.act, size_t(T) * w.I}, {&b.rows_res, size_t(R) * w.H},
      {&b.rows_delta, size_t(R) * w.H}, {&b.rows_normed, size_t(R) * w.H},
      {&b.head_out, w.dtype == DType::kFloat32 ? 0 : size_t(R) * head_rows}};
  size_t total = 0;
  for (const auto& [field, elements] : parts) {
    *field = base ? base + total : nullptr;
    total += aligned(elements * e);
  }
  return total;
}

void project(const ProjectionWeight& p, const void* x, int M, void* out, DType act) {
  LinearParams lp{};
  lp.x = x;
  lp.x_stride = p.K;
  lp.x_dtype = act;
  lp.w = p.packed ? p.packed : p.w;
  lp.w_stride = p.K;
  lp.w_packed = p.packed != nullptr;
  lp.w_dtype = p.dtype;
  lp.scales = p.scales;
  lp.out = out;
  lp.out_stride = p.N;
  lp.M = M;
  lp.N = p.N;
  lp.K = p.K;
  linear_cpu(lp);
}

// out = weight * norm(x) per row; with `residual`, residual += x first (rms_norm_cpu).
void rms_norm(const DecoderWeights& w, const void* x, void* residual, const void* weight,
              void* out, int rows, float eps) {
  RmsNormParams p{};
  p.x = x;
  p.x_stride = w.H;
  p.residual = residual;
  p.weight = weight;
  p.out = out;
  p.dtype = w.dtype;
  p.T = rows;
  p.H = w.H;
  p.eps = eps;
  rms_norm_cpu(p);
}

// x += y elementwise, rounded to the dtype (torch's `x + y`); the swin layout's adds.
template <typename T>
void add_rounded(T* x, const T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = from_float<T>(to_float(x[i]) + to_float(y[i]));
}
void add_rounded(DType dtype, void* x, const void* y, int64_t n) {
  if (dtype == DType::kFloat32) add_rounded(static_cast<float*>(x), static_cast<const float*>(y), n);
  else add_rounded(static_cast<bf16_t*>(x), static_cast<const bf16_t*>(y), n);
}

// The attention sublayer of `h [T, H]` -> b.delta (the output projection).
void attention(const DecoderWeights& w, const DecoderLayerWeights& l,
               const DecoderStepInputs& s, const void* h, const Buffers& b) {
  const int T = s.T, D = w.D;
  const int64_t qkv_width = int64_t(w.Hq + 2 * w.Hkv) * D;
  const int64_t e = dtype_size(w.dtype);
  project(l.qkv, h, T, b.qkv, w.dtype);

  QkNormRopeParams qk{};
  qk.qkv = b.qkv;
  qk.qkv_stride = qkv_width;
  qk.q_weight = l.q_norm_weight;
  qk.q_bias = l.q_norm_bias;
  qk.k_weight = l.k_norm_weight;
  qk.k_bias = l.k_norm_bias;
  qk.positions = s.positions;
  qk.inv_freq = w.inv_freq;
  qk.dtype = w.dtype;
  qk.T = T;
  qk.Hq = w.Hq;
  qk.Hkv = w.Hkv;
  qk.D = D;
  qk.eps = w.qk_eps;
  qk_norm_rope_cpu(qk);

  const char* k = b.qkv + int64_t(w.Hq) * D * e;  // strided views into qkv, as in Python
  const char* v = b.qkv + int64_t(w.Hq + w.Hkv) * D * e;
  KvAppendParams kv{};
  kv.k = k;
  kv.v = v;
  kv.k_stride_t = kv.v_stride_t = qkv_width;
  kv.k_stride_h = kv.v_stride_h = D;
  kv.k_cache = l.k_cache;
  kv.v_cache = l.v_cache;
  kv.slots = s.slots;
  kv.T = T;
  kv.Hkv = w.Hkv;
  kv.D = D;
  kv.NB = w.NB;
  kv.BS = w.BS;
  kv.dtype = w.dtype;
  kv_append_cpu(kv);

  PagedAttentionParams pa{};
  pa.q = b.qkv;
  pa.q_stride_t = qkv_width;
  pa.q_stride_h = D;
  pa.k_cache = l.k_cache;
  pa.v_cache = l.v_cache;
  pa.block_tables = s.block_tables;
  pa.block_table_stride = s.MB;
  pa.seq_lens = s.seq_lens;
  pa.cu_seqlens_q = s.cu_seqlens_q;
  pa.out = b.attn;
  pa.out_stride_t = int64_t(w.Hq) * D;
  pa.out_stride_h = D;
  pa.lse = nullptr;
  pa.T = T;
  pa.B = s.B;
  pa.H = w.Hq;
  pa.Hkv = w.Hkv;
  pa.D = D;
  pa.NB = w.NB;
  pa.BS = w.BS;
  pa.MB = s.MB;
  pa.scale = float(1.0 / std::sqrt(double(D)));  // as Python's 1 / math.sqrt(d)
  pa.causal = true;
  pa.dtype = w.dtype;
  pa.max_q_len = s.max_q_len;
  pa.max_seq_len = s.max_seq_len;
  paged_attention_cpu(pa);

  project(l.o, b.attn, T, b.delta, w.dtype);
}

// The MLP sublayer of `h [T, H]` -> b.delta.
void mlp(const DecoderWeights& w, const DecoderLayerWeights& l, int T, const void* h,
         const Buffers& b) {
  project(l.gate_up, h, T, b.gate_up, w.dtype);
  SwigluParams sw{};
  sw.gate_up = b.gate_up;
  sw.gate_up_stride = 2 * int64_t(w.I);
  sw.out = b.act;
  sw.dtype = w.dtype;
  sw.T = T;
  sw.I = w.I;
  swiglu_cpu(sw);
  project(l.down, b.act, T, b.delta, w.dtype);
}

}  // namespace

void validate_decoder_step(const DecoderWeights& w, const DecoderStepInputs& s) {
  if (s.T < 1 || s.B < 1 || s.MB < 1 || s.R < 0)
    fail("needs T >= 1 tokens, B >= 1 sequences, MB >= 1 blocks a sequence and R >= 0 rows, "
         "got T = " + std::to_string(s.T) + ", B = " + std::to_string(s.B) + ", MB = " +
         std::to_string(s.MB) + ", R = " + std::to_string(s.R));
  if (s.R > 0 && (s.head < 0 || s.head >= int(w.heads.size())))
    fail("head " + std::to_string(s.head) + " does not exist (the decoder has " +
         std::to_string(w.heads.size()) + ")");
  for (int t = 0; t < s.T; ++t) {
    if (s.ids[t] < 0 || s.ids[t] >= w.vocab_rows)
      fail("ids[" + std::to_string(t) + "] = " + std::to_string(s.ids[t]) +
           " is outside the embedding table [0, " + std::to_string(w.vocab_rows) + ")");
    if (s.slots[t] < -1 || int64_t(s.slots[t]) >= int64_t(w.NB) * w.BS)
      fail("slots[" + std::to_string(t) + "] = " + std::to_string(s.slots[t]) +
           " is outside [-1, " + std::to_string(int64_t(w.NB) * w.BS) + ")");
  }
  if (s.cu_seqlens_q[0] != 0 || s.cu_seqlens_q[s.B] != s.T)
    fail("cu_seqlens_q must run from 0 to T = " + std::to_string(s.T) + ", got " +
         std::to_string(s.cu_seqlens_q[0]) + " .. " + std::to_string(s.cu_seqlens_q[s.B]));
  int max_q = 0, max_len = 0;
  for (int b = 0; b < s.B; ++b) {
    const int q_len = s.cu_seqlens_q[b + 1] - s.cu_seqlens_q[b];
    const int len = s.seq_lens[b];
    if (q_len < 0 || len < q_len || int64_t(len) > int64_t(s.MB) * w.BS)
      fail("sequence " + std::to_string(b) + ": " + std::to_string(q_len) +
           " new tokens and seq_len " + std::to_string(len) + " (must be q_len <= seq_len <= "
           "MB * BS = " + std::to_string(int64_t(s.MB) * w.BS) + ")");
    for (int j = 0; j < (len + w.BS - 1) / w.BS; ++j) {
      const int32_t id = s.block_tables[int64_t(b) * s.MB + j];
      if (id < 0 || id >= w.NB)
        fail("block_tables[" + std::to_string(b) + ", " + std::to_string(j) + "] = " +
             std::to_string(id) + " is outside the cache's [0, " + std::to_string(w.NB) +
             ") blocks");
    }
    max_q = std::max(max_q, q_len);
    max_len = std::max(max_len, len);
  }
  if (s.max_q_len < max_q || s.max_seq_len < max_len)
    fail("max_q_len / max_seq_len (" + std::to_string(s.max_q_len) + ", " +
         std::to_string(s.max_seq_len) + ") are below the step's (" + std::to_string(max_q) +
         ", " + std::to_string(max_len) + ")");
  for (int r = 0; r < s.R; ++r)
    if (s.rows[r] < 0 || s.rows[r] >= s.T)
      fail("rows[" + std::to_string(r) + "] = " + std::to_string(s.rows[r]) +
           " is not a token of the step [0, " + std::to_string(s.T) + ")");
}

size_t decoder_step_scratch_bytes(const DecoderWeights& w, int T, int R, int head) {
  Buffers unused{};
  return cut_buffers(w, T, R, head, nullptr, unused);
}

void decoder_step_cpu(const DecoderWeights& w, const DecoderStepInputs& s, void* scratch,
                      size_t scratch_bytes) {
  Buffers b{};
  const size_t need = cut_buffers(w, s.T, s.R, s.head, static_cast<char*>(scratch), b);
  if (scratch_bytes < need)
    fail("scratch holds " + std::to_string(scratch_bytes) + " bytes, the step needs " +
         std::to_string(need));
  const int T = s.T;
  const size_t row_bytes = size_t(w.H) * dtype_size(w.dtype);
  const int64_t state = int64_t(T) * w.H;

  // Embeddings: the state (the plain layout's first residual; the first layer's norm
  // reads it as is).
  for (int t = 0; t < T; ++t)
    std::memcpy(b.residual + t * row_bytes,
                static_cast<const char*>(w.embed) + s.ids[t] * row_bytes, row_bytes);

  for (size_t i = 0; i < w.layers.size(); ++i) {
    const DecoderLayerWeights& layer = w.layers[i];
    if (w.swin_norm) {  // x += rms(attn(x)); x += rms(mlp(x)), x in b.residual
      attention(w, layer, s, b.residual, b);
      rms_norm(w, b.delta, nullptr, layer.input_norm, b.normed, T, w.rms_eps);
      add_rounded(w.dtype, b.residual, b.normed, state);
      mlp(w, layer, T, b.residual, b);
      rms_norm(w, b.delta, nullptr, layer.post_norm, b.normed, T, w.rms_eps);
      add_rounded(w.dtype, b.residual, b.normed, state);
      continue;
    }
    // Plain: the state is residual + delta, each add inside the next norm.
    if (i == 0) rms_norm(w, b.residual, nullptr, layer.input_norm, b.normed, T, w.rms_eps);
    else rms_norm(w, b.delta, b.residual, layer.input_norm, b.normed, T, w.rms_eps);
    attention(w, layer, s, b.normed, b);
    rms_norm(w, b.delta, b.residual, layer.post_norm, b.normed, T, w.rms_eps);
    mlp(w, layer, T, b.normed, b);
  }
  if (s.R == 0) return;

  // Logits of the sampling rows: final norm of (residual + delta) or of the swin state.
  const bool pending_delta = !w.swin_norm && !w.layers.empty();
  for (int r = 0; r < s.R; ++r) {
    std::memcpy(b.rows_res + r * row_bytes, b.residual + s.rows[r] * row_bytes, row_bytes);
    if (pending_delta)
      std::memcpy(b.rows_delta + r * row_bytes, b.delta + s.rows[r] * row_bytes, row_bytes);
  }
  if (pending_delta)
    rms_norm(w, b.rows_delta, b.rows_res, w.final_norm, b.rows_normed, s.R, w.rms_eps);
  else
    rms_norm(w, b.rows_res, nullptr, w.final_norm, b.rows_normed, s.R, w.rms_eps);
  const ProjectionWeight& head = w.heads[s.head];
  if (w.dtype == DType::kFloat32) {
    project(head, b.rows_normed, s.R, s.logits, w.dtype);
    return;
  }
  project(head, b.rows_normed, s.R, b.head_out, w.dtype);
  const bf16_t* h = reinterpret_cast<const bf16_t*>(b.head_out);
  const int64_t n = int64_t(s.R) * head.N;
  for (int64_t i = 0; i < n; ++i) s.logits[i] = to_float(h[i]);
}

}  // namespace cm3rt
