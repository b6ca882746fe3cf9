// CUDA paged attention entry point: checks what the kernels assume, plans the launch from
// host-known bounds only (never reads device memory), and dispatches to
//   split-KV decode + merge   when every sequence has at most one query row (max_q_len 1),
//   tensor-core prefill       for float16 / bfloat16 otherwise,
//   SIMT prefill              for float32 otherwise.
// Everything runs on the caller's stream, allocates nothing and never synchronises, so a
// decode step can be captured in a CUDA graph (with a workspace allocated beforehand).
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "attention/paged_attention.h"
#include "attention/paged_attention_launch.h"
#include "attention/paged_attention_plan.h"
#include "common/device.h"
#include "common/dispatch.h"

namespace cm3rt {

namespace {

// The kernels move 16-byte vectors of q, out and the caches.
void require_aligned16(const char* name, const void* ptr, std::initializer_list<int64_t> strides,
                       int esize) {
  bool ok = reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
  for (int64_t s : strides) ok = ok && (s * esize) % 16 == 0;
  if (!ok)
    throw std::invalid_argument(std::string("paged_attention: argument '") + name +
                                "' must be 16-byte aligned on CUDA (data pointer and strides of "
                                "the leading dims), got pointer " +
                                std::to_string(reinterpret_cast<uintptr_t>(ptr)));
}

int current_sm_count() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return cuda_sm_count(dev);
}

}  // namespace

void paged_attention_cuda(const PagedAttentionParams& p, void* stream) {
  if (p.T <= 0 || p.B <= 0) return;
  if (p.H <= 0 || p.Hkv <= 0 || p.H % p.Hkv != 0)
    throw std::invalid_argument("paged_attention: query heads H = " + std::to_string(p.H) +
                                " must be a positive multiple of kv heads Hkv = " +
                                std::to_string(p.Hkv));
  // A clear error for an unsupported head dim before anything is launched.
  (void)CM3RT_DISPATCH_HEAD_DIM(p.D, "paged_attention", kD, [] { return kD; });
  const int esize = dtype_size(p.dtype);
  require_aligned16("q", p.q, {p.q_stride_t, p.q_stride_h}, esize);
  require_aligned16("out", p.out, {p.out_stride_t, p.out_stride_h}, esize);
  require_aligned16("k_cache", p.k_cache, {}, esize);
  require_aligned16("v_cache", p.v_cache, {}, esize);

  const int max_q_len = attn_plan::effective_max_q_len(p.T, p.max_q_len);
  if (max_q_len == 1) {
    const attn_plan::DecodePlan plan =
        attn_plan::plan_decode(p.B, p.H, p.Hkv, p.D, p.max_seq_len, current_sm_count());
    if (plan.workspace_bytes > 0) {
      if (p.workspace == nullptr || p.workspace_bytes < plan.workspace_bytes)
        throw std::invalid_argument(
            "paged_attention: argument 'workspace' must hold at least " +
            std::to_string(plan.workspace_bytes) + " bytes for the split-KV decode plan (B = " +
            std::to_string(p.B) + ", H = " + std::to_string(p.H) + ", D = " + std::to_string(p.D) +
            ", " + std::to_string(plan.splits) + " splits), got " +
            (p.workspace == nullptr ? std::string("none") : std::to_string(p.workspace_bytes)) +
            " (size it with paged_attention_workspace_bytes for the same shapes)");
      if (reinterpret_cast<uintptr_t>(p.workspace) % 16 != 0)
        throw std::invalid_argument("paged_attention: argument 'workspace' must be 16-byte aligned");
    }
    launch_decode(p, plan, stream);
    return;
  }
  switch (p.dtype) {
    case DType::kFloat32: launch_prefill_simt(p, max_q_len, stream); break;
    case DType::kFloat16: launch_prefill_mma_f16(p, max_q_len, stream); break;
    case DType::kBFloat16: launch_prefill_mma_bf16(p, max_q_len, stream); break;
    default:
      throw_unsupported("paged_attention", "dtype", dtype_name(p.dtype),
                        "float32, float16, bfloat16");
  }
}

}  // namespace cm3rt
