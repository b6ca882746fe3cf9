// The self-test registry (tests/selftests.h).
#include <map>
#include <stdexcept>

#include "tests/registry.h"

namespace emu::selftest {

std::map<std::string, Test>& registry() {
  static std::map<std::string, Test> r;
  return r;
}

Register::Register(const char* name, Test t) { registry()[name] = t; }

std::vector<std::string> names() {
  std::vector<std::string> v;
  for (const auto& [n, t] : registry()) v.push_back(n);
  return v;
}

std::string run(const std::string& name) {
  auto it = registry().find(name);
  if (it == registry().end()) throw std::invalid_argument("no emulator self-test " + name);
  return it->second();
}

}  // namespace emu::selftest
