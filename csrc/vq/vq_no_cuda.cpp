// CUDA entry points of the VQ family in a build without CUDA. The bindings refuse CUDA tensors
// before dispatch in such a build, so these only satisfy the linker.
#include <stdexcept>

#include "vq/vq.h"

#if !CM3RT_WITH_CUDA
namespace cm3rt {

void vq_nearest_cuda(const VqNearestParams&, void*) {
  throw std::runtime_error("vq_nearest: cm3rt was built without CUDA");
}
void vq_embed_cuda(const VqEmbedParams&, void*) {
  throw std::runtime_error("vq_embed: cm3rt was built without CUDA");
}

}  // namespace cm3rt
#endif
