// Per-thread scratch memory for kernels that pack their inputs once per call.
#pragma once

#include <cstddef>
#include <vector>

namespace cm3rt::cpu {

// At least n elements of T, owned by the calling thread and reused by its later calls, so a
// decode step's kernels neither allocate nor (for large packs, which malloc would mmap
// afresh) page-fault every call. Contents are unspecified: the caller fills what it reads.
// Tag tells apart two buffers of one type that must be alive together.
template <typename T, int Tag = 0>
T* thread_scratch(size_t n) {
  static thread_local std::vector<T> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

}  // namespace cm3rt::cpu
