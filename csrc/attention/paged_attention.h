// paged_attention: attention of packed variable-length queries over a paged KV cache.
//
// Contract (docs/DESIGN.md, "Kernel contracts"): sequence b owns query rows
// cu_seqlens_q[b] .. cu_seqlens_q[b+1] (q_len_b rows, the last q_len_b tokens of its
// seq_lens[b] keys). With causal, query i of b attends to key positions
// <= seq_lens[b] - q_len_b + i. Key position j of b lives in block block_tables[b][j / BS],
// offset j % BS. Query head h reads kv head h / (H / Hkv). Softmax and accumulation in fp32.
// lse (optional) receives the natural-log log-sum-exp of the scaled scores, -inf for a row
// that attends to no key (its output is 0).
//
// One contract covers prefill, chunked prefill after a cached prefix, and decode (q_len 1);
// the CUDA side picks a prefill (tensor-core) or split-KV decode kernel.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/dtype.h"

namespace cm3rt {

struct PagedAttentionParams {
  const void* q;                   // [T, H, D], last dim contiguous
  int64_t q_stride_t, q_stride_h;  // element strides of q
  const void* k_cache;             // [NB, BS, Hkv, D] contiguous
  const void* v_cache;             // [NB, BS, Hkv, D] contiguous
  const int32_t* block_tables;     // [B, MB]
  int64_t block_table_stride;      // elements between rows of block_tables
  const int32_t* seq_lens;         // [B]   keys of each sequence (cached + new)
  const int32_t* cu_seqlens_q;     // [B+1] query row offsets, cu[0] = 0, cu[B] = T
  void* out;                       // [T, H, D], last dim contiguous
  int64_t out_stride_t, out_stride_h;
  float* lse;                      // [T, H] contiguous, or nullptr
  int T, B, H, Hkv, D, NB, BS, MB;
  float scale;                     // softmax scale (usually 1/sqrt(D))
  bool causal;
  DType dtype;                     // of q, k_cache, v_cache and out
  // Host-known upper bounds used by the CUDA launch planner (never read from device memory):
  int max_q_len;                   // >= every q_len_b  (T when unknown)
  int max_seq_len;                 // >= every seq_lens[b] (MB * BS when unknown)
  // CUDA split-KV scratch; see paged_attention_workspace_bytes. Ignored on CPU.
  void* workspace;
  size_t workspace_bytes;
};

void paged_attention_cpu(const PagedAttentionParams& p);
void paged_attention_cuda(const PagedAttentionParams& p, void* stream);

// Bytes of scratch the CUDA kernels need for these shapes (0 when no split is planned).
// The caller allocates it (kernels never allocate), so the call can be graph-captured.
size_t paged_attention_workspace_bytes(int T, int B, int H, int D, int max_q_len,
                                       int max_seq_len, int device_sm_count);

}  // namespace cm3rt
