// CUDA entry points of the attention family in a build without CUDA. The bindings refuse
// CUDA tensors before dispatch in such a build, so these only satisfy the linker.
#include <stdexcept>

#include "attention/kv_append.h"
#include "attention/paged_attention.h"

#if !CM3RT_WITH_CUDA
namespace cm3rt {

void kv_append_cuda(const KvAppendParams&, void*) {
  throw std::runtime_error("kv_append: cm3rt was built without CUDA");
}
void paged_attention_cuda(const PagedAttentionParams&, void*) {
  throw std::runtime_error("paged_attention: cm3rt was built without CUDA");
}

}  // namespace cm3rt
#endif
