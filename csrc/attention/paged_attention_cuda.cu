// CUDA paged attention: written by the CUDA kernel work (prefill on tensor cores, split-KV
// decode + merge). Until then the entry points raise a clear error.
#include <stdexcept>

#include "attention/paged_attention.h"

namespace cm3rt {

void paged_attention_cuda(const PagedAttentionParams&, void*) {
  throw std::runtime_error("paged_attention: the CUDA kernel is not implemented yet");
}

}  // namespace cm3rt
