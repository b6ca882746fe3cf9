// Launch planning of the CUDA paged attention: pure host arithmetic, built on every platform
// so that the Python tests can check it without a GPU (through
// paged_attention_workspace_bytes).
//
// Which kernel runs:
//   effective max_q_len == 1 (every row a decode token)  -> split-KV decode + merge
//   otherwise, float16 / bfloat16                        -> tensor-core prefill (mma.m16n8k16)
//   otherwise, float32                                   -> SIMT prefill
// The prefill kernels are correct for any mix of q_len (0, 1, many); the decode path is
// chosen only when the host knows that no sequence has more than one query row.
//
// Split-KV decode (flash-decoding): a CTA per (sequence, kv head, head chunk, split), where a
// head chunk is up to kDecodeMaxHeads query heads of that kv head. When those CTAs cannot
// fill the GPU, each sequence's key range is cut into `splits` near-equal parts; each part
// writes a normalised partial output and its log-sum-exp to the workspace, and a merge
// kernel combines them. Workspace layout (float32):
//   partial_out [splits, B, H, D], then partial_lse [splits, B, H].
#pragma once

#include <cstddef>

namespace cm3rt::attn_plan {

constexpr int kPrefillMmaBlockM = 64;   // query rows per tensor-core prefill CTA
constexpr int kPrefillSimtBlockM = 16;  // query rows per float32 prefill CTA
constexpr int kDecodeMaxHeads = 4;      // query heads a decode CTA holds in registers
constexpr int kDecodeCtasPerSm = 4;     // target resident decode CTAs per SM
constexpr int kDecodeMinKeysPerSplit = 256;  // a split reads at least this many keys
constexpr int kDecodeMaxSplits = 32;
constexpr int kMaxGridYZ = 65535;       // CUDA limit of gridDim.y and gridDim.z

// max_q_len as the launch uses it: the caller's bound clamped to T (T when <= 0).
int effective_max_q_len(int T, int max_q_len);

struct DecodePlan {
  int head_chunks;         // ceil((H / Hkv) / kDecodeMaxHeads)
  int splits;              // key splits per sequence (1: no workspace, no merge)
  size_t lse_offset;       // byte offset of partial_lse in the workspace
  size_t workspace_bytes;  // 0 when splits == 1
};

// Plan of the decode path for B sequences, H query heads over Hkv kv heads, head dim D,
// every sequence at most max_seq_len keys, on a device with sm_count SMs (<= 0: unknown,
// no split). Splits are chosen so that B * Hkv * head_chunks * splits reaches about
// kDecodeCtasPerSm * sm_count CTAs, with at least kDecodeMinKeysPerSplit keys per split.
DecodePlan plan_decode(int B, int H, int Hkv, int D, int max_seq_len, int sm_count);

}  // namespace cm3rt::attn_plan
