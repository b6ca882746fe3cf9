// Tensor-core prefill instantiations for float16 (one translation unit per dtype so that the
// two compile in parallel).
#include "attention/paged_attention_launch.h"
#include "attention/prefill_mma.cuh"

namespace cm3rt {

void launch_prefill_mma_f16(const PagedAttentionParams& p, int max_q_len, void* stream) {
  prefill_mma::launch<half_t>(p, max_q_len, stream);
}

}  // namespace cm3rt
