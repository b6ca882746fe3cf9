#pragma once

#include <string>

#include "tests/selftests.h"

namespace emu::selftest {

using Test = std::string (*)();
struct Register {
  Register(const char* name, Test t);
};
// A failed expectation of a primitive test.
[[noreturn]] void fail(const std::string& msg);

}  // namespace emu::selftest

#define EMU_SELFTEST(name)                                             \
  static std::string selftest_##name();                                \
  static ::emu::selftest::Register register_##name(#name, selftest_##name); \
  static std::string selftest_##name()
