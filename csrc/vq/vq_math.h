// The argmin rule of vq_nearest, shared by the CPU and CUDA kernels.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/dtype.h"
#include "common/macros.h"

namespace cm3rt {

// Distance up to the per-row constant ||z||^2: ||e||^2 - 2 z.e.
CM3RT_HD float vq_score(float sqnorm, float dot) { return fmaf(-2.0f, dot, sqnorm); }

// Only finite scores compete (NaN / inf in z make every score of the row non-finite, and the
// row gets -1). Scanning codes in increasing j with a strict "<" keeps the lowest j of a tie.
CM3RT_HD bool vq_better(float score, float best) { return (score < best) & (score > -INFINITY); }

// Order-preserving packing of (score, j) into one uint64 for merging partial results with
// atomicMin / min: smaller score first, then smaller j. -0 packs like +0.
CM3RT_HD uint64_t vq_pack(float score, int j) {
  uint32_t u = float_bits(score);
  if (u == 0x80000000u) u = 0u;
  const uint32_t key = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (uint64_t(key) << 32) | uint32_t(j);
}
constexpr uint64_t kVqNone = ~uint64_t(0);  // no competing score seen

CM3RT_HD int64_t vq_unpack_index(uint64_t packed) {
  return packed == kVqNone ? int64_t(-1) : int64_t(uint32_t(packed));
}

}  // namespace cm3rt
