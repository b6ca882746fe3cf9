// Host launchers of the CUDA paged attention kernels, one per translation unit so that the
// instantiations compile in parallel. Called by paged_attention_cuda (paged_attention_cuda.cu)
// after validation and planning; each runs on `stream`, allocates nothing, never synchronises.
#pragma once

#include "attention/paged_attention.h"
#include "attention/paged_attention_plan.h"

namespace cm3rt {

// Tensor-core prefill (any q_len mix); grid from max_q_len (the effective host bound).
void launch_prefill_mma_f16(const PagedAttentionParams& p, int max_q_len, void* stream);
void launch_prefill_mma_bf16(const PagedAttentionParams& p, int max_q_len, void* stream);
// float32 prefill on CUDA cores (any q_len mix).
void launch_prefill_simt(const PagedAttentionParams& p, int max_q_len, void* stream);
// Split-KV decode (every q_len <= 1) and, when plan.splits > 1, the merge into `out`.
// p.workspace must hold plan.workspace_bytes (checked by the caller).
void launch_decode(const PagedAttentionParams& p, const attn_plan::DecodePlan& plan, void* stream);

}  // namespace cm3rt
