// cm3rt._C: the pybind11 module over the torch-free kernel library in csrc/.
#include <pybind11/pybind11.h>

#include "bindings.h"
#include "common/device.h"

namespace py = pybind11;

#ifndef CM3RT_MODULE_NAME
#define CM3RT_MODULE_NAME _C
#endif

// cm3rt._C, or with CM3RT_EMU cm3rt._emu: the same bindings over the CUDA kernels running
// under the CPU emulator (tools/cuda_emu/), for CPU tensors.
PYBIND11_MODULE(CM3RT_MODULE_NAME, m) {
  m.doc() = "cm3rt kernels (CPU always; CUDA when built with nvcc). Tensors in via DLPack.";
  m.def("built_with_cuda", &cm3rt::built_with_cuda, "True if the CUDA kernels were compiled in.");
  m.def("cuda_archs", &cm3rt::cuda_archs, "CUDA architectures compiled for ('' without CUDA).");
  m.def("simd_level", &cm3rt::simd_level, "SIMD level the CPU kernels were compiled for.");
  m.def("cuda_device_count", &cm3rt::cuda_device_count,
        "CUDA devices visible to the kernels; 0 without a GPU or driver (never raises).");
  m.def("cuda_sm_count", &cm3rt::cuda_sm_count, py::arg("device") = 0);
  m.def("build_info", &cm3rt::build_info_string, "One-line summary of the build.");
  cm3rt::py_binding::bind_attention(m);
  cm3rt::py_binding::bind_sampling(m);
  cm3rt::py_binding::bind_vq(m);
  cm3rt::py_binding::bind_linear(m);
  cm3rt::py_binding::bind_layer(m);
#if defined(CM3RT_EMU)
  cm3rt::py_binding::bind_emulator(m);
#else
  cm3rt::py_binding::bind_decoder(m);
  m.attr("EMULATED") = false;
#endif
}
