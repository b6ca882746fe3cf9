// Prefill paged attention on tensor cores (float16 / bfloat16, sm80+), FlashAttention-2 style.
//
// CTA = (query head h, sequence b, tile of kM = 64 query rows); 4 warps, each owning 16 rows.
// Grid (H, B, q_tiles) with q_tiles from the host bound max_q_len; tiles past a sequence's
// q_len exit at once, and tiles are numbered from the last (most causal work) down so the
// heaviest CTAs start first. K/V tiles of kN keys are gathered through the block table with
// cp.async into a two-stage ring, so the copy of tile i+1 overlaps the math on tile i:
//   S = Q K^T      (mma m16n8k16; Q and K fragments by ldmatrix from shared memory)
//   scale, causal mask (key < causal_key_count(row)), online softmax in registers
//   O += P V       (P re-used from the S accumulators as A fragments; V by ldmatrix.trans)
// Shared rows are D + 8 elements long: D / 8 + 1 (odd) 16-byte units, so the 8 rows of every
// ldmatrix 8x8 matrix fall in 8 different bank groups (no conflicts, any supported D).
// Keys whose block id is out of range are zero-filled and recorded; every row that attends
// such a key is written as NaN (and its lse).
#pragma once

#include <algorithm>
#include <climits>
#include <cmath>
#include <stdexcept>
#include <string>

#include "attention/cuda_primitives.cuh"
#include "attention/online_softmax.h"
#include "attention/paged_attention.h"
#include "attention/paged_attention_plan.h"
#include "attention/paged_index.h"
#include "common/device.h"
#include "common/dispatch.h"

namespace cm3rt::prefill_mma {

template <int D>
struct Tile {
  static_assert(D % 16 == 0, "head dim must be a multiple of 16 for m16n8k16");
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kM = attn_plan::kPrefillMmaBlockM;  // query rows per CTA (16 per warp)
  static constexpr int kN = D <= 128 ? 64 : 32;            // keys per K/V tile
  static constexpr int kStride = D + 8;                    // shared row length (elements)
  static constexpr int kChunks = D / 8;                    // 16-byte chunks per row
  static constexpr int kQ = kM * kStride;                  // elements of the Q tile
  static constexpr int kKV = kN * kStride;                 // elements of one K (or V) tile
  static constexpr size_t kSmemBytes = size_t(kQ + 4 * kKV) * 2;  // Q + 2 stages of K and V
  static_assert(kM == 16 * kWarps, "one 16-row mma block per warp");
  static_assert(kN % 16 == 0, "keys come in 16-key mma steps");
};

template <typename T, int D>
__global__ void __launch_bounds__(Tile<D>::kThreads)
    prefill_mma_kernel(PagedAttentionParams p, int b_base) {
  using C = Tile<D>;
  using M = cuda::Mma<T>;
  constexpr int kNc = C::kN / 8;  // 8-key column blocks of S
  constexpr int kDc = D / 8;      // 8-dim column blocks of O

  const int h = blockIdx.x;
  const int b = b_base + blockIdx.y;
  const int tile = gridDim.z - 1 - blockIdx.z;
  const SeqSpan sp = make_seq_span(p.cu_seqlens_q[b], p.cu_seqlens_q[b + 1], p.seq_lens[b], p.T,
                                   p.MB, p.BS);
  const int q0 = tile * C::kM;
  if (q0 >= sp.q_len) return;  // whole CTA: before any barrier
  const int rows = min(C::kM, sp.q_len - q0);
  const int g = h / (p.H / p.Hkv);
  // Keys the CTA needs: the causal limit of its last row (limits grow with the row).
  const int k_end = causal_key_count(sp.seq_len, sp.q_len, q0 + rows - 1, p.causal);
  const int n_tiles = (k_end + C::kN - 1) / C::kN;
  const int32_t* table = p.block_tables + int64_t(b) * p.block_table_stride;
  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  const T* q = static_cast<const T*>(p.q);

  T* q_s = cuda::dynamic_smem<T>();  // [kM][kStride]
  T* k_s = q_s + C::kQ;              // [2][kN][kStride]
  T* v_s = k_s + 2 * C::kKV;         // [2][kN][kStride]
  __shared__ int first_bad;          // smallest key position in an out-of-range block

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  if (tid == 0) first_bad = INT_MAX;
  __syncthreads();

  // Q tile: rows past q_len are zero-filled (never written out).
  for (int i = tid; i < C::kM * C::kChunks; i += C::kThreads) {
    const int r = i / C::kChunks, c = i % C::kChunks;
    const bool ok = r < rows;
    const T* src = ok ? q + int64_t(sp.t0 + q0 + r) * p.q_stride_t + int64_t(h) * p.q_stride_h + c * 8
                      : q;
    cuda::cp_async_16(q_s + r * C::kStride + c * 8, src, ok);
  }
  cuda::cp_async_commit();

  // K/V tile `it` into ring stage `stage`; keys past k_end and in bad blocks are zero-filled
  // (so P * V stays finite: their P is 0 and 0 * garbage could be NaN).
  auto load_kv = [&](int it, int stage) {
    T* ks = k_s + stage * C::kKV;
    T* vs = v_s + stage * C::kKV;
    for (int i = tid; i < C::kN * C::kChunks; i += C::kThreads) {
      const int r = i / C::kChunks, c = i % C::kChunks;
      const int j = it * C::kN + r;
      int64_t off = -1;
      if (j < k_end) {
        off = paged_key_offset(table, j, p.BS, p.NB, p.Hkv, g, D);
        if (off < 0 && c == 0) atomicMin(&first_bad, j);
      }
      const bool ok = off >= 0;
      cuda::cp_async_16(ks + r * C::kStride + c * 8, ok ? kc + off + c * 8 : kc, ok);
      cuda::cp_async_16(vs + r * C::kStride + c * 8, ok ? vc + off + c * 8 : vc, ok);
    }
  };
  if (n_tiles > 0) load_kv(0, 0);
  cuda::cp_async_commit();

  // This thread's two rows (g and g + 8 of the warp's 16) and their causal key limits.
  const int row0 = warp * 16 + lane / 4;
  int kmax[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int r = row0 + 8 * hf;
    kmax[hf] = r < rows ? causal_key_count(sp.seq_len, sp.q_len, q0 + r, p.causal) : 0;
  }
  // Keys any row of this warp attends (warp-uniform): later tiles are skipped by the warp.
  const int warp_kend = warp * 16 < rows
      ? causal_key_count(sp.seq_len, sp.q_len, q0 + min(warp * 16 + 15, rows - 1), p.causal)
      : 0;

  float o[kDc][4];
#pragma unroll
  for (int dc = 0; dc < kDc; ++dc)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[dc][e] = 0.0f;
  SoftmaxState st[2] = {softmax_state_init(), softmax_state_init()};  // l: this thread's part

  // ldmatrix row addresses of this lane (see cuda_primitives.cuh for the fragment layouts).
  const int lr = lane % 8, lm = lane / 8;  // row within a matrix, matrix index
  // Q (A, 16x16 at rows warp*16, dims kk*16): matrices (rows +0/+8) x (dims +0/+8).
  const T* q_frag = q_s + (warp * 16 + lr + (lm % 2) * 8) * C::kStride + (lm / 2) * 8;
  // K (B = K^T, 16 dims x 8 keys): matrices (keys +0, dims +0/+8), (keys +8, dims +0/+8).
  const int k_frag = (lr + (lm / 2) * 8) * C::kStride + (lm % 2) * 8;
  // V (B, 16 keys x 8 dims, transposed load): (keys +0/+8, dims +0), (keys +0/+8, dims +8).
  const int v_frag = (lr + (lm % 2) * 8) * C::kStride + (lm / 2) * 8;

  for (int it = 0; it < n_tiles; ++it) {
    if (it + 1 < n_tiles) {
      load_kv(it + 1, (it + 1) % 2);
      cuda::cp_async_commit();
      cuda::cp_async_wait<1>();  // Q and tile `it` have landed (this thread's copies)
    } else {
      cuda::cp_async_wait<0>();
    }
    __syncthreads();  // ... and everyone else's
    const int kv0 = it * C::kN;
    if (kv0 < warp_kend) {
      const T* ks = k_s + (it % 2) * C::kKV;
      const T* vs = v_s + (it % 2) * C::kKV;

      // S = Q K^T for the warp's 16 rows x kN keys.
      float s[kNc][4];
#pragma unroll
      for (int nc = 0; nc < kNc; ++nc)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nc][e] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[4];
        cuda::ldmatrix_x4(a, q_frag + kk * 16);
#pragma unroll
        for (int nn = 0; nn < C::kN / 16; ++nn) {
          uint32_t bk[4];
          cuda::ldmatrix_x4(bk, ks + nn * 16 * C::kStride + kk * 16 + k_frag);
          M::run(s[2 * nn], a, bk[0], bk[1]);
          M::run(s[2 * nn + 1], a, bk[2], bk[3]);
        }
      }

      // Scale, mask, online softmax. Element e of block nc: row row0 + 8 * (e / 2),
      // key kv0 + nc * 8 + 2 * (lane % 4) + e % 2.
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float mx = -INFINITY;
#pragma unroll
        for (int nc = 0; nc < kNc; ++nc)
#pragma unroll
          for (int e2 = 0; e2 < 2; ++e2) {
            const int e = 2 * hf + e2;
            const int key = kv0 + nc * 8 + 2 * (lane % 4) + e2;
            s[nc][e] = key < kmax[hf] ? s[nc][e] * p.scale : -INFINITY;
            mx = fmaxf(mx, s[nc][e]);
          }
        // The 4 lanes of a quad hold the same row.
        mx = fmaxf(mx, cuda::shfl_xor(mx, 1));
        mx = fmaxf(mx, cuda::shfl_xor(mx, 2));
        const float alpha = softmax_update_max(st[hf], mx);
        float sum = 0.0f;
#pragma unroll
        for (int nc = 0; nc < kNc; ++nc)
#pragma unroll
          for (int e2 = 0; e2 < 2; ++e2) {
            const float w = softmax_weight(st[hf], s[nc][2 * hf + e2]);
            s[nc][2 * hf + e2] = w;
            sum += w;
          }
        st[hf].l += sum;
#pragma unroll
        for (int dc = 0; dc < kDc; ++dc) {
          o[dc][2 * hf] *= alpha;
          o[dc][2 * hf + 1] *= alpha;
        }
      }

      // O += P V: the S accumulators of key blocks 2kk, 2kk+1 are the A fragment of step kk.
#pragma unroll
      for (int kk = 0; kk < C::kN / 16; ++kk) {
        const uint32_t a[4] = {M::pack(s[2 * kk][0], s[2 * kk][1]),
                               M::pack(s[2 * kk][2], s[2 * kk][3]),
                               M::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                               M::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int dd = 0; dd < D / 16; ++dd) {
          uint32_t bv[4];
          cuda::ldmatrix_x4_trans(bv, vs + kk * 16 * C::kStride + dd * 16 + v_frag);
          M::run(o[2 * dd], a, bv[0], bv[1]);
          M::run(o[2 * dd + 1], a, bv[2], bv[3]);
        }
      }
    }
    __syncthreads();  // stage it % 2 is refilled by the next iteration
  }
  cuda::cp_async_wait<0>();
  __syncthreads();  // first_bad is final

  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    float l = st[hf].l;
    l += cuda::shfl_xor(l, 1);
    l += cuda::shfl_xor(l, 2);
    st[hf].l = l;
    const int r = row0 + 8 * hf;
    if (r >= rows) continue;
    const bool bad = first_bad < kmax[hf];
    const float inv = softmax_inv_sum(st[hf]);
    const int64_t t = sp.t0 + q0 + r;
    T* orow = out + t * p.out_stride_t + int64_t(h) * p.out_stride_h;
#pragma unroll
    for (int dc = 0; dc < kDc; ++dc) {
      const float v0 = bad ? NAN : o[dc][2 * hf] * inv;
      const float v1 = bad ? NAN : o[dc][2 * hf + 1] * inv;
      *reinterpret_cast<uint32_t*>(orow + dc * 8 + 2 * (lane % 4)) = M::pack(v0, v1);
    }
    if (p.lse != nullptr && lane % 4 == 0) p.lse[t * p.H + h] = bad ? NAN : softmax_lse(st[hf]);
  }
}

template <typename T>
void launch(const PagedAttentionParams& p, int max_q_len, void* stream) {
  CM3RT_DISPATCH_HEAD_DIM(p.D, "paged_attention", kD, [&] {
    using C = Tile<kD>;
    auto kernel = prefill_mma_kernel<T, kD>;
    if (!cuda::set_max_dynamic_smem(kernel, C::kSmemBytes))
      throw std::runtime_error("paged_attention: head dim " + std::to_string(kD) + " needs " +
                               std::to_string(C::kSmemBytes) +
                               " bytes of shared memory per block, more than this GPU allows");
    const int q_tiles = (max_q_len + C::kM - 1) / C::kM;
    if (q_tiles > attn_plan::kMaxGridYZ)
      throw std::invalid_argument("paged_attention: max_q_len " + std::to_string(max_q_len) +
                                  " needs more than 65535 query tiles");
    for (int b_base = 0; b_base < p.B; b_base += attn_plan::kMaxGridYZ) {
      const dim3 grid(unsigned(p.H), unsigned(std::min(p.B - b_base, attn_plan::kMaxGridYZ)),
                      unsigned(q_tiles));
      cuda::launch<prefill_mma_kernel<T, kD>>(grid, dim3(C::kThreads), C::kSmemBytes,
                                              static_cast<cudaStream_t>(stream), p, b_base);
    }
  });
  check_cuda_launch("paged_attention");
}

}  // namespace cm3rt::prefill_mma
