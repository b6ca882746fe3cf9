// Bindings of csrc/vq (filled in by the vq kernel work).
#include "bindings.h"

namespace cm3rt::py_binding {

void bind_vq(pybind11::module_& m) { (void)m; }

}  // namespace cm3rt::py_binding
