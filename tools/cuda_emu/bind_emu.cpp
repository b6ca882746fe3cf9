// cm3rt._emu's own functions: the emulated device's properties, counters, and the emulator's
// self-tests (tests/): PTX-model unit tests and deliberately broken kernels, one per detector.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "bindings.h"
#include "emu.h"
#include "tests/selftests.h"

namespace py = pybind11;

namespace cm3rt::py_binding {

void bind_emulator(py::module_& m) {
  m.attr("EMULATED") = true;
  m.def("set_sm_count", [](int n) { emu::device_props().sm_count = n; }, py::arg("n"),
        "SM count the emulated device reports (default 132, an H100 / H200).");
  m.def("stats", [] {
    const emu::Stats& s = emu::stats();
    py::dict d;
    d["launches"] = s.launches;
    d["blocks"] = s.blocks;
    d["threads"] = s.threads;
    d["switches"] = s.switches;
    d["checked_accesses"] = s.checked_accesses;
    return d;
  }, "Counters since the module was loaded.");
  m.def("launched_kernels", [] { return emu::launched_kernels(); },
        "Names of every kernel instantiation launched since the module was loaded.");
  m.def("selftest_names", [] { return emu::selftest::names(); },
        "Names of the emulator's self-tests (tools/cuda_emu/tests/).");
  m.def("selftest", [](const std::string& name) { return emu::selftest::run(name); },
        py::arg("name"),
        "Runs one self-test. Returns its report; a checker finding raises RuntimeError.");
}

}  // namespace cm3rt::py_binding
