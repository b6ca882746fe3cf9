// CUDA entry point of the linear family in a build without CUDA. The bindings refuse CUDA
// tensors before dispatch in such a build, so this only satisfies the linker.
#include <stdexcept>

#include "linear/linear.h"

#if !CM3RT_WITH_CUDA
namespace cm3rt {

void linear_cuda(const LinearParams&, void*) {
  throw std::runtime_error("linear: cm3rt was built without CUDA");
}

}  // namespace cm3rt
#endif
