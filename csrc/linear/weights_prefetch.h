// Software prefetch of the weight stream, shared by the AVX-512 and AVX2 linear kernels
// (linear_cpu_avx512.cpp, linear_cpu_panels_avx512.cpp, linear_cpu_panels_avx2.cpp): each
// weight line is read with a prefetch of the line the next block of channels reads at the
// same offset of K.
//
// Measured on 48 matrices of 2816 x 1024 (past the L3), M = 8, one thread: bf16 1386 ->
// 746 us, int8 805 -> 486 us, fp32 1203 -> 967 us; 2 KB ahead in the same rows or into L2
// only were slower there. Where the lines go depends on the CPU: on AMD Zen 4, prefetches
// into L1 hold the core's few L1 miss buffers, and the weight stream stalled at ~8 GB/s of
// its ~27; prefetched into L2 only (PREFETCHT1), 40 DRAM-resident 2816 x 1024 matrices,
// M = 8, one thread, ran bf16 664-676 -> 374-416 us, fp32 1098-1273 -> 879-937 us, int8
// 489-548 -> 457 us (two threads: bf16 428-495 -> 264-269 us). Other CPUs keep L1.
// (Include only where the build has SSE: every x86-64 build.)
#pragma once

#include <immintrin.h>

namespace cm3rt::cpu {

enum class PrefetchTo { kL1, kL2 };

template <PrefetchTo kTo>
inline void prefetch_weights(const void* line) {
  const char* p = static_cast<const char*>(line);
  if constexpr (kTo == PrefetchTo::kL1) _mm_prefetch(p, _MM_HINT_T0);
  else _mm_prefetch(p, _MM_HINT_T1);
}

// Where this CPU's weight lines are prefetched to (above).
inline PrefetchTo weights_prefetch_target() {
  static const PrefetchTo to = __builtin_cpu_is("amd") ? PrefetchTo::kL2 : PrefetchTo::kL1;
  return to;
}

}  // namespace cm3rt::cpu
