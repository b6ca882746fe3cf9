// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), the
// counter-based generator of the sampler. Pure 32-bit integer arithmetic, so the CPU and the
// CUDA kernels produce the same bits for the same (counter, key): a group's draw depends only
// on its own (seed, step), never on where the group sits in the batch.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace cm3rt {

struct Philox4x32 {
  uint32_t v[4];
};

CM3RT_HD uint32_t philox_mulhi32(uint32_t a, uint32_t b) {
#if CM3RT_ON_DEVICE
  return __umulhi(a, b);
#else
  return uint32_t((uint64_t(a) * uint64_t(b)) >> 32);
#endif
}

// 10 rounds with the Random123 constants; checked against its known-answer vectors
// (tests/test_sampling.py::test_philox_known_answers).
CM3RT_HD Philox4x32 philox4x32_10(Philox4x32 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) { k0 += kW0; k1 += kW1; }
    const uint32_t hi0 = philox_mulhi32(kM0, ctr.v[0]), lo0 = kM0 * ctr.v[0];
    const uint32_t hi1 = philox_mulhi32(kM1, ctr.v[2]), lo1 = kM1 * ctr.v[2];
    ctr = Philox4x32{{hi1 ^ ctr.v[1] ^ k0, lo1, hi0 ^ ctr.v[3] ^ k1, lo0}};
  }
  return ctr;
}

// 64 random bits for purpose `lane` of a group's (seed, step): key = seed, counter =
// (step, lane). Different purposes (lanes) give independent streams.
CM3RT_HD uint64_t philox_u64(uint64_t seed, uint64_t step, uint32_t lane) {
  const Philox4x32 out = philox4x32_10(
      Philox4x32{{uint32_t(step), uint32_t(step >> 32), lane, 0u}}, uint32_t(seed),
      uint32_t(seed >> 32));
  return (uint64_t(out.v[0]) << 32) | out.v[1];
}

// floor(r * n / 2^64): maps 64 uniform bits onto [0, n) (Lemire's multiply-shift). Each
// target value receives floor or ceil of 2^64 / n inputs, so a run of w consecutive targets
// is hit with probability w / n to within 2^-64.
CM3RT_HD uint64_t mulhi64(uint64_t r, uint64_t n) {
#if CM3RT_ON_DEVICE
  return __umul64hi(r, n);
#else
  return uint64_t((unsigned __int128)r * n >> 64);
#endif
}

}  // namespace cm3rt
