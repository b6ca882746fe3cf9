// The emulator's self-tests (tests/*.cu): unit tests of the PTX models and warp primitives
// against the PTX ISA, and one deliberately broken kernel per detector (with its fixed
// twin, which must run clean).
#pragma once

#include <string>
#include <vector>

namespace emu::selftest {

std::vector<std::string> names();
// Runs test `name`; returns a short report. Throws emu::Error for a checker finding and
// std::runtime_error when a primitive does not match its definition.
std::string run(const std::string& name);

}  // namespace emu::selftest
