// kv_append on the CPU: one memcpy of D elements per (token, kv head).
#include <cstring>

#include "attention/kv_append.h"

namespace cm3rt {

void kv_append_cpu(const KvAppendParams& p) {
  const int64_t esize = dtype_size(p.dtype);
  const int64_t num_slots = int64_t(p.NB) * p.BS;
  const auto* k = static_cast<const char*>(p.k);
  const auto* v = static_cast<const char*>(p.v);
  auto* kc = static_cast<char*>(p.k_cache);
  auto* vc = static_cast<char*>(p.v_cache);
  const size_t row_bytes = size_t(p.D) * esize;
#pragma omp parallel for schedule(static) if (int64_t(p.T) * p.Hkv * p.D > (1 << 15))
  for (int t = 0; t < p.T; ++t) {
    const int32_t slot = p.slots[t];
    if (slot < 0 || slot >= num_slots) continue;  // padding (or rejected earlier)
    const int64_t dst_row = int64_t(slot) * p.Hkv;  // == (block * BS + offset) * Hkv
    for (int h = 0; h < p.Hkv; ++h) {
      const int64_t dst = (dst_row + h) * p.D * esize;
      std::memcpy(kc + dst, k + (t * p.k_stride_t + h * p.k_stride_h) * esize, row_bytes);
      std::memcpy(vc + dst, v + (t * p.v_stride_t + h * p.v_stride_h) * esize, row_bytes);
    }
  }
}

}  // namespace cm3rt
