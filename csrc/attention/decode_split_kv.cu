// Split-KV decode paged attention (flash-decoding) and the merge of its partial results.
//
// Decode CTA = (sequence b, kv head g, head chunk, split s), 128 threads; it serves up to
// kMaxHeads query heads of kv head g (GQA: each K/V vector is loaded once for all of them)
// over split s of the sequence's keys. Thread layout: kTpk "dim lanes" x kKeyLanes "key
// lanes"; a dim lane holds 8 elements of a key (one 16-byte load for 16-bit types, two for
// float32), the kTpk lanes of a key sit in one warp and reduce the dot product by xor
// shuffles. Each key lane runs its own online softmax over keys key_lane, key_lane +
// kKeyLanes, ... (kKB of them per step, loads issued together); the key lanes are combined
// through shared memory with the same online-softmax rule at the end. With one split the
// CTA writes the output; otherwise a normalised partial output and its lse go to the
// workspace (layout in paged_attention_plan.h) and merge_kernel combines the splits with
// lse_merge_weights. Specialised on head dim only: the element type is a runtime switch
// around loads and stores (uniform over the grid), which keeps compile time down.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "attention/cuda_primitives.cuh"
#include "attention/online_softmax.h"
#include "attention/paged_attention_launch.h"
#include "attention/paged_index.h"
#include "common/device.h"
#include "common/dispatch.h"

namespace cm3rt {

namespace {

constexpr int kThreads = 128;
constexpr int kVec = 8;  // elements per dim lane
constexpr int kKB = 2;   // keys per key lane and step
constexpr int kMaxHeads = attn_plan::kDecodeMaxHeads;

template <int D>
struct DecodeShape {
  // Dim lanes per key: D / 8 rounded up to a power of two (80 and 96 leave lanes idle).
  static constexpr int kTpk = D / kVec <= 4 ? 4 : D / kVec <= 8 ? 8 : D / kVec <= 16 ? 16 : 32;
  static constexpr int kKeyLanes = kThreads / kTpk;
  static_assert(D % kVec == 0 && D / kVec <= 32, "head dim");
};

// 8 raw elements: 16 bytes (16-bit types, `hi` unused) or 32 bytes (float32).
struct Raw8 {
  uint4 lo, hi;
};

CM3RT_DEVICE Raw8 raw8_zero() { return {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)}; }

// Elements [elem, elem + 8) of `base` (16-byte aligned: checked on the host).
CM3RT_DEVICE Raw8 load_raw8(const void* base, int64_t elem, bool f32) {
  Raw8 r = raw8_zero();
  if (f32) {
    const float* f = static_cast<const float*>(base) + elem;
    r.lo = cuda::ldg16(f);
    r.hi = cuda::ldg16(f + 4);
  } else {
    r.lo = cuda::ldg16(static_cast<const uint16_t*>(base) + elem);
  }
  return r;
}

CM3RT_DEVICE float half_bits_to_float(uint32_t bits, DType dt) {
  return dt == DType::kBFloat16 ? to_float(bf16_t{uint16_t(bits)}) : to_float(half_t{uint16_t(bits)});
}

CM3RT_DEVICE void raw8_to_float(const Raw8& r, DType dt, float (&f)[kVec]) {
  const uint32_t w[8] = {r.lo.x, r.lo.y, r.lo.z, r.lo.w, r.hi.x, r.hi.y, r.hi.z, r.hi.w};
  if (dt == DType::kFloat32) {
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = bits_float(w[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // lower 16 bits hold the lower element
      f[2 * i] = half_bits_to_float(w[i] & 0xffffu, dt);
      f[2 * i + 1] = half_bits_to_float(w[i] >> 16, dt);
    }
  }
}

CM3RT_DEVICE void store_elem(void* base, int64_t idx, DType dt, float v) {
  switch (dt) {
    case DType::kFloat16: static_cast<half_t*>(base)[idx] = from_float<half_t>(v); break;
    case DType::kBFloat16: static_cast<bf16_t*>(base)[idx] = from_float<bf16_t>(v); break;
    default: static_cast<float*>(base)[idx] = v; break;
  }
}

template <int D>
__global__ void __launch_bounds__(kThreads)
    decode_kernel(PagedAttentionParams p, int head_chunks, int splits, float* ws_o, float* ws_lse) {
  using S = DecodeShape<D>;
  __shared__ float sm_m[S::kKeyLanes][kMaxHeads];
  __shared__ float sm_l[S::kKeyLanes][kMaxHeads];
  __shared__ float sm_o[S::kKeyLanes][kMaxHeads][D];

  const int b = blockIdx.x;
  const int g = blockIdx.y / head_chunks, chunk = blockIdx.y % head_chunks;
  const int split = blockIdx.z;
  const int group = p.H / p.Hkv;
  const int h0 = g * group + chunk * kMaxHeads;          // first query head of this CTA
  const int gc = min(kMaxHeads, group - chunk * kMaxHeads);  // heads of this CTA
  const SeqSpan sp = make_seq_span(p.cu_seqlens_q[b], p.cu_seqlens_q[b + 1], p.seq_lens[b], p.T,
                                   p.MB, p.BS);
  if (sp.q_len == 0) return;  // nothing to write; the merge skips this sequence too
  const int64_t t = sp.t0;    // the sequence's (first) query row
  const int kmax = causal_key_count(sp.seq_len, sp.q_len, 0, p.causal);
  int k_begin, k_end;
  split_key_range(kmax, split, splits, k_begin, k_end);
  const int32_t* table = p.block_tables + int64_t(b) * p.block_table_stride;

  const int tid = threadIdx.x;
  const int dl = tid % S::kTpk, kl = tid / S::kTpk;
  const int d0 = dl * kVec;
  const bool active = d0 < D;
  const bool f32 = p.dtype == DType::kFloat32;

  float q[kMaxHeads][kVec];
#pragma unroll
  for (int hh = 0; hh < kMaxHeads; ++hh) {
    if (hh < gc && active) {
      raw8_to_float(load_raw8(p.q, t * p.q_stride_t + int64_t(h0 + hh) * p.q_stride_h + d0, f32),
                    p.dtype, q[hh]);
#pragma unroll
      for (int e = 0; e < kVec; ++e) q[hh][e] *= p.scale;
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) q[hh][e] = 0.0f;
    }
  }
  SoftmaxState st[kMaxHeads];
  float acc[kMaxHeads][kVec];
#pragma unroll
  for (int hh = 0; hh < kMaxHeads; ++hh) {
    st[hh] = softmax_state_init();
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[hh][e] = 0.0f;
  }

  bool bad = false;  // a key of this split lies in an out-of-range block
  for (int j0 = k_begin; j0 < k_end; j0 += S::kKeyLanes * kKB) {  // uniform trip count
    Raw8 kr[kKB], vr[kKB];
    bool ok[kKB];  // same for the kTpk lanes of a key
#pragma unroll
    for (int kb = 0; kb < kKB; ++kb) {
      const int j = j0 + kb * S::kKeyLanes + kl;
      int64_t off = -1;
      if (j < k_end) {
        off = paged_key_offset(table, j, p.BS, p.NB, p.Hkv, g, D);
        bad |= off < 0;
      }
      ok[kb] = off >= 0;
      kr[kb] = raw8_zero();
      vr[kb] = raw8_zero();
      if (ok[kb] && active) {
        kr[kb] = load_raw8(p.k_cache, off + d0, f32);
        vr[kb] = load_raw8(p.v_cache, off + d0, f32);
      }
    }
    float kf[kKB][kVec], vf[kKB][kVec];
#pragma unroll
    for (int kb = 0; kb < kKB; ++kb) {
      raw8_to_float(kr[kb], p.dtype, kf[kb]);
      raw8_to_float(vr[kb], p.dtype, vf[kb]);
    }
#pragma unroll
    for (int hh = 0; hh < kMaxHeads; ++hh) {
      if (hh >= gc) break;  // CTA-uniform: the shuffles below see full warps
      float s[kKB];
      float mx = -INFINITY;
#pragma unroll
      for (int kb = 0; kb < kKB; ++kb) {
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < kVec; ++e) dot = fmaf(q[hh][e], kf[kb][e], dot);
#pragma unroll
        for (int m = S::kTpk / 2; m > 0; m /= 2) dot += cuda::shfl_xor(dot, m);
        s[kb] = ok[kb] ? dot : -INFINITY;
        mx = fmaxf(mx, s[kb]);
      }
      const float alpha = softmax_update_max(st[hh], mx);
      float w[kKB];
#pragma unroll
      for (int kb = 0; kb < kKB; ++kb) {
        w[kb] = softmax_weight(st[hh], s[kb]);
        st[hh].l += w[kb];
      }
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        float a = acc[hh][e] * alpha;
#pragma unroll
        for (int kb = 0; kb < kKB; ++kb) a = fmaf(w[kb], vf[kb][e], a);
        acc[hh][e] = a;
      }
    }
  }

  // Combine the key lanes: the same rescaling rule as a new tile, one lane state at a time.
  if (dl == 0)
#pragma unroll
    for (int hh = 0; hh < kMaxHeads; ++hh) {
      sm_m[kl][hh] = st[hh].m;
      sm_l[kl][hh] = st[hh].l;
    }
  if (active)
#pragma unroll
    for (int hh = 0; hh < kMaxHeads; ++hh)
#pragma unroll
      for (int e = 0; e < kVec; ++e) sm_o[kl][hh][d0 + e] = acc[hh][e];
  bad = __syncthreads_or(bad);

  for (int i = tid; i < gc * D; i += kThreads) {
    const int hh = i / D, d = i % D;
    SoftmaxState tot = softmax_state_init();
    float o = 0.0f;
    for (int k = 0; k < S::kKeyLanes; ++k) {
      const float m = sm_m[k][hh];
      const float alpha = softmax_update_max(tot, m);
      const float wk = softmax_weight(tot, m);  // exp(m_k - m_total), 0 for an idle lane
      tot.l += wk * sm_l[k][hh];
      o = o * alpha + wk * sm_o[k][hh][d];
    }
    const float val = bad ? NAN : o * softmax_inv_sum(tot);
    const float lse = bad ? NAN : softmax_lse(tot);
    const int h = h0 + hh;
    if (splits == 1) {
      store_elem(p.out, t * p.out_stride_t + int64_t(h) * p.out_stride_h + d, p.dtype, val);
      if (d == 0 && p.lse != nullptr) p.lse[t * p.H + h] = lse;
    } else {
      const int64_t row = (int64_t(split) * p.B + b) * p.H + h;
      ws_o[row * D + d] = val;
      if (d == 0) ws_lse[row] = lse;
    }
  }
}

// One warp per (sequence, query head): out = sum_s w_s * o_s with the lse merge weights.
constexpr int kMergeWarps = 4;

__global__ void __launch_bounds__(32 * kMergeWarps)
    merge_kernel(PagedAttentionParams p, int splits, const float* ws_o, const float* ws_lse) {
  const int64_t row = int64_t(blockIdx.x) * kMergeWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= int64_t(p.B) * p.H) return;
  const int b = int(row / p.H), h = int(row % p.H);
  const SeqSpan sp = make_seq_span(p.cu_seqlens_q[b], p.cu_seqlens_q[b + 1], p.seq_lens[b], p.T,
                                   p.MB, p.BS);
  if (sp.q_len == 0) return;
  constexpr int kPerLane = 256 / 32;  // D <= 256
  float o[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) o[i] = 0.0f;
  float lse = -INFINITY;
  bool nan = false;  // a split saw a bad block id: the row is NaN
  for (int s = 0; s < splits; ++s) {
    const int64_t prow = (int64_t(s) * p.B + b) * p.H + h;
    const float ls = ws_lse[prow];
    nan |= ls != ls;
    float w_acc, w_new;
    lse = lse_merge_weights(lse, ls, w_acc, w_new);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < p.D) o[i] = w_acc * o[i] + w_new * ws_o[prow * p.D + d];
    }
  }
  const int64_t t = sp.t0;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < p.D)
      store_elem(p.out, t * p.out_stride_t + int64_t(h) * p.out_stride_h + d, p.dtype,
                 nan ? NAN : o[i]);
  }
  if (lane == 0 && p.lse != nullptr) p.lse[t * p.H + h] = nan ? NAN : lse;
}

}  // namespace

void launch_decode(const PagedAttentionParams& p, const attn_plan::DecodePlan& plan, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  const int64_t grid_y = int64_t(p.Hkv) * plan.head_chunks;
  if (grid_y > attn_plan::kMaxGridYZ || plan.splits > attn_plan::kMaxGridYZ)
    throw std::invalid_argument("paged_attention: " + std::to_string(p.H) +
                                " query heads exceed the decode grid (at most 65535 CTAs along "
                                "kv heads x head chunks)");
  float* ws_o = nullptr;
  float* ws_lse = nullptr;
  if (plan.splits > 1) {
    ws_o = static_cast<float*>(p.workspace);
    ws_lse = reinterpret_cast<float*>(static_cast<char*>(p.workspace) + plan.lse_offset);
  }
  const dim3 grid(unsigned(p.B), unsigned(grid_y), unsigned(plan.splits));
  CM3RT_DISPATCH_HEAD_DIM(p.D, "paged_attention", kD, [&] {
    cuda::launch<decode_kernel<kD>>(grid, dim3(kThreads), 0, s, p, plan.head_chunks, plan.splits,
                                    ws_o, ws_lse);
  });
  check_cuda_launch("paged_attention (decode)");
  if (plan.splits > 1) {
    const int64_t rows = int64_t(p.B) * p.H;
    const unsigned blocks = unsigned((rows + kMergeWarps - 1) / kMergeWarps);
    cuda::launch<merge_kernel>(dim3(blocks), dim3(32 * kMergeWarps), 0, s, p, plan.splits,
                               static_cast<const float*>(ws_o), static_cast<const float*>(ws_lse));
    check_cuda_launch("paged_attention (split-KV merge)");
  }
}

}  // namespace cm3rt
