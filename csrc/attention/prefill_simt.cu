// float32 prefill paged attention on CUDA cores: plain, exact fp32, specialised on head dim
// only. Same grid and contract as the tensor-core prefill (prefill_mma.cuh).
//
// CTA = (query head h, sequence b, tile of kM = 16 query rows), 128 threads: 8 threads per
// row (row = tid / 8, lane c = tid % 8, all in one warp). Per tile of kKeys keys, gathered
// into shared memory through the block table: thread c scores keys c, c + 8, ...; the row's
// max and sum are reduced over its 8 lanes; the weights go through shared memory and each
// thread accumulates dims c, c + 8, ... of its row. Shared rows of Q and K are D + 1 floats
// long so the 4 rows a warp reads at once sit in different banks.
#include <algorithm>
#include <climits>
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

template <int D>
struct SimtTile {
  static constexpr int kThreads = 128;
  static constexpr int kM = attn_plan::kPrefillSimtBlockM;  // query rows per CTA
  static constexpr int kLanes = kThreads / kM;              // threads per row
  static constexpr int kKeys = D > 128 ? 8 : 16;            // keys per shared tile
  static constexpr int kStride = D + 1;                     // Q and K shared row length
  static_assert(kLanes == 8 && kKeys % kLanes == 0 && D % kLanes == 0, "thread mapping");
};

template <int D>
__global__ void __launch_bounds__(SimtTile<D>::kThreads)
    prefill_simt_kernel(PagedAttentionParams p, int b_base) {
  using C = SimtTile<D>;
  constexpr int kPerLaneKeys = C::kKeys / C::kLanes;
  constexpr int kPerLaneDims = D / C::kLanes;
  __shared__ float q_s[C::kM * C::kStride];
  __shared__ float k_s[C::kKeys * C::kStride];
  __shared__ float v_s[C::kKeys * D];
  __shared__ float p_s[C::kM * C::kKeys];
  __shared__ int first_bad;  // smallest key position in an out-of-range block

  const int h = blockIdx.x;
  const int b = b_base + blockIdx.y;
  const int tile = gridDim.z - 1 - blockIdx.z;
  const SeqSpan sp = make_seq_span(p.cu_seqlens_q[b], p.cu_seqlens_q[b + 1], p.seq_lens[b], p.T,
                                   p.MB, p.BS);
  const int q0 = tile * C::kM;
  if (q0 >= sp.q_len) return;
  const int rows = min(C::kM, sp.q_len - q0);
  const int g = h / (p.H / p.Hkv);
  const int k_end = causal_key_count(sp.seq_len, sp.q_len, q0 + rows - 1, p.causal);
  const int n_tiles = (k_end + C::kKeys - 1) / C::kKeys;
  const int32_t* table = p.block_tables + int64_t(b) * p.block_table_stride;
  const float* q = static_cast<const float*>(p.q);
  const float* kc = static_cast<const float*>(p.k_cache);
  const float* vc = static_cast<const float*>(p.v_cache);

  const int tid = threadIdx.x, r = tid / C::kLanes, c = tid % C::kLanes;
  if (tid == 0) first_bad = INT_MAX;
  for (int i = tid; i < C::kM * D; i += C::kThreads) {
    const int rr = i / D, d = i % D;
    q_s[rr * C::kStride + d] =
        rr < rows ? q[int64_t(sp.t0 + q0 + rr) * p.q_stride_t + int64_t(h) * p.q_stride_h + d] : 0.0f;
  }
  const int kmax = r < rows ? causal_key_count(sp.seq_len, sp.q_len, q0 + r, p.causal) : 0;

  float acc[kPerLaneDims];
#pragma unroll
  for (int i = 0; i < kPerLaneDims; ++i) acc[i] = 0.0f;
  SoftmaxState st = softmax_state_init();

  for (int it = 0; it < n_tiles; ++it) {
    const int kv0 = it * C::kKeys;
    __syncthreads();  // Q written / the previous tile consumed
    for (int i = tid; i < C::kKeys * D; i += C::kThreads) {
      const int jj = i / D, d = i % D, j = kv0 + jj;
      float kx = 0.0f, vx = 0.0f;  // keys past k_end or in bad blocks: zeros (finite)
      if (j < k_end) {
        const int64_t off = paged_key_offset(table, j, p.BS, p.NB, p.Hkv, g, D);
        if (off >= 0) {
          kx = kc[off + d];
          vx = vc[off + d];
        } else if (d == 0) {
          atomicMin(&first_bad, j);
        }
      }
      k_s[jj * C::kStride + d] = kx;
      v_s[jj * D + d] = vx;
    }
    __syncthreads();

    float s[kPerLaneKeys];
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < kPerLaneKeys; ++i) {
      const int jj = c + C::kLanes * i;
      const float* qr = q_s + r * C::kStride;
      const float* kr = k_s + jj * C::kStride;
      float dot = 0.0f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) dot = fmaf(qr[d], kr[d], dot);
      s[i] = kv0 + jj < kmax ? dot * p.scale : -INFINITY;
      mx = fmaxf(mx, s[i]);
    }
#pragma unroll
    for (int m = 1; m < C::kLanes; m *= 2) mx = fmaxf(mx, cuda::shfl_xor(mx, m));
    const float alpha = softmax_update_max(st, mx);
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLaneKeys; ++i) {
      const float w = softmax_weight(st, s[i]);
      p_s[r * C::kKeys + c + C::kLanes * i] = w;
      sum += w;
    }
#pragma unroll
    for (int m = 1; m < C::kLanes; m *= 2) sum += cuda::shfl_xor(sum, m);
    st.l += sum;
    __syncwarp();  // the row's weights (written by its 8 lanes, same warp) are visible
#pragma unroll
    for (int i = 0; i < kPerLaneDims; ++i) {
      float a = acc[i] * alpha;
#pragma unroll
      for (int jj = 0; jj < C::kKeys; ++jj)
        a = fmaf(p_s[r * C::kKeys + jj], v_s[jj * D + c + C::kLanes * i], a);
      acc[i] = a;
    }
  }
  __syncthreads();  // first_bad is final
  if (r >= rows) return;
  const bool bad = first_bad < kmax;
  const float inv = softmax_inv_sum(st);
  const int64_t t = sp.t0 + q0 + r;
  float* orow = static_cast<float*>(p.out) + t * p.out_stride_t + int64_t(h) * p.out_stride_h;
#pragma unroll
  for (int i = 0; i < kPerLaneDims; ++i) orow[c + C::kLanes * i] = bad ? NAN : acc[i] * inv;
  if (p.lse != nullptr && c == 0) p.lse[t * p.H + h] = bad ? NAN : softmax_lse(st);
}

}  // namespace

void launch_prefill_simt(const PagedAttentionParams& p, int max_q_len, void* stream) {
  CM3RT_DISPATCH_HEAD_DIM(p.D, "paged_attention", kD, [&] {
    using C = SimtTile<kD>;
    const int q_tiles = (max_q_len + C::kM - 1) / C::kM;
    if (q_tiles > attn_plan::kMaxGridYZ)
      throw std::invalid_argument("paged_attention: max_q_len " + std::to_string(max_q_len) +
                                  " needs more than 65535 float32 query tiles");
    for (int b_base = 0; b_base < p.B; b_base += attn_plan::kMaxGridYZ) {
      const dim3 grid(unsigned(p.H), unsigned(std::min(p.B - b_base, attn_plan::kMaxGridYZ)),
                      unsigned(q_tiles));
      cuda::launch<prefill_simt_kernel<kD>>(grid, dim3(C::kThreads), 0,
                                            static_cast<cudaStream_t>(stream), p, b_base);
    }
  });
  check_cuda_launch("paged_attention");
}

}  // namespace cm3rt
