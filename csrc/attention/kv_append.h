// kv_append: scatter new keys/values into the paged KV cache.
//
// Contract (docs/DESIGN.md, "Kernel contracts"): token t is written to block slots[t] / BS, offset slots[t] % BS;
// slot -1 means "skip" (padding). Slots outside [-1, NB*BS) are skipped as well, so a bad
// slot can never write out of bounds (the bindings reject them before the call on CPU).
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace cm3rt {

struct KvAppendParams {
  const void* k;            // [T, Hkv, D], last dim contiguous
  const void* v;            // [T, Hkv, D], last dim contiguous
  int64_t k_stride_t, k_stride_h;  // element strides of k
  int64_t v_stride_t, v_stride_h;  // element strides of v
  void* k_cache;            // [NB, BS, Hkv, D] contiguous
  void* v_cache;            // [NB, BS, Hkv, D] contiguous
  const int32_t* slots;     // [T]
  int T, Hkv, D, NB, BS;
  DType dtype;              // of k, v and both caches
};

void kv_append_cpu(const KvAppendParams& p);
void kv_append_cuda(const KvAppendParams& p, void* stream);

}  // namespace cm3rt
