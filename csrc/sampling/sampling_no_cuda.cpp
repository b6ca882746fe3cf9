// CUDA entry point of the sampling family in a build without CUDA. The bindings refuse CUDA
// tensors before dispatch in such a build, so this only satisfies the linker.
#include <stdexcept>

#include "sampling/sample_logits.h"

#if !CM3RT_WITH_CUDA
namespace cm3rt {

void sample_logits_cuda(const SampleLogitsParams&, void*) {
  throw std::runtime_error("sample_logits: cm3rt was built without CUDA");
}

}  // namespace cm3rt
#endif
