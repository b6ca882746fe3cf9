// State shared by the emulator's runtime (runtime.cpp) and checker (checker.cpp). Not seen
// by kernel code.
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "emu.h"

namespace emu {

// A call site of a barrier or collective (compared by pointer and line: cheap).
struct Site {
  const char* file = "";
  int line = 0;
  bool operator!=(const Site& o) const { return line != o.line || file != o.file; }
  std::string str() const;
};

struct AsyncCopy {
  void* dst;
  const void* src;  // nullptr: zero-fill
};

struct Fiber {
  enum StateKind { kRunnable, kCtaBarrier, kWarpWait, kDone };
  void* sp = nullptr;                  // saved stack pointer while switched out
  char* stack_lo = nullptr;
  char* stack_hi = nullptr;
  uint3 tid{0, 0, 0};
  int linear = 0;                      // x + y * bx + z * bx * by
  StateKind state = kRunnable;
  Site bar_site;                       // call site of the barrier it waits at
  int in_runtime = 0;                  // > 0: inside the emulator (its accesses are not the kernel's)
  int bar_result = 0;                  // __syncthreads_or result
  std::vector<AsyncCopy> open_copies;  // cp.async not yet committed
  std::vector<std::vector<AsyncCopy>> groups;  // committed groups, oldest first
  std::string where() const;           // "thread (x,y,z) of block (x,y,z)"
};

struct Warp {
  unsigned arrived = 0;  // lanes waiting in the current collective
  unsigned mask = 0;
  const char* op = "";
  Site site;
  uint64_t in[32] = {};
  uint64_t out[32] = {};
  uint32_t wide[32][4] = {};  // 128-bit results (ldmatrix, mma)
  uint32_t epoch = 0;         // __syncwarp count: racecheck orders a warp's accesses by it
};

struct State {
  DeviceProps props;
  Stats stats;
  // launch
  std::string kernel;
  void* params = nullptr;
  char* params_lo = nullptr;
  char* params_hi = nullptr;
  void (*invoke)(void*) = nullptr;
  uint3 gdim{1, 1, 1}, bdim{1, 1, 1}, block{0, 0, 0};
  std::map<const void*, size_t> smem_limit;
  std::set<std::string> launched;
  // block
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<Fiber*> runnable;  // a stack: the most recently woken runs next
  Fiber* cur = nullptr;
  void* sched_sp = nullptr;
  int live = 0;
  int cta_waiting = 0;
  int cta_or = 0;
  uint32_t cta_epoch = 0;  // __syncthreads count of the block (racecheck)
  bool divergence_reported = false;
  // shared memory
  unsigned char* dyn = nullptr;  // the block's dynamic shared memory
  size_t dyn_bytes = 0;
  // findings
  std::vector<std::string> findings;
  long more_findings = 0;
  std::string fatal;  // set by abort_launch: the launch stops
};

State& S();

void block_current();
[[noreturn]] void abort_launch(const std::string& msg);
void report(const std::string& msg);
// Marks the current fiber as running emulator code for the scope: library code the
// linker shares with the instrumented kernels (std::string, ...) is then not checked.
struct InRuntime {
  Fiber* f;
  explicit InRuntime(Fiber* fiber) : f(fiber) { if (f) ++f->in_runtime; }
  ~InRuntime() { if (f) --f->in_runtime; }
};
void thread_exited(Fiber& f);
void finish_async_copies(Fiber& f);

// ---- checker ----------------------------------------------------------------------------------
enum class Access { kRead, kWrite, kAtomic, kAsyncIssue };
// Checks an access of the current fiber (no-op outside a kernel); `pc` is the code address
// that made it (for messages).
void check_access(const void* addr, size_t n, Access kind, void* pc);
bool is_shared(const void* addr, size_t n);
void begin_block();
void land_async(void* dst, const Fiber& f);  // a cp.async destination has landed
std::string hex(const void* p);
std::string code_at(const void* pc);  // "file:line" of kernel code, for messages

}  // namespace emu
