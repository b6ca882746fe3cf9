// Bindings of csrc/sampling (filled in by the sampling kernel work).
#include "bindings.h"

namespace cm3rt::py_binding {

void bind_sampling(pybind11::module_& m) { (void)m; }

}  // namespace cm3rt::py_binding
