// The emulator's runtime: fibers, the block scheduler, barriers, warp collectives, the PTX
// models, the CUDA runtime API shim. The checker (which every access goes through) is in
// checker.cpp; both share the state declared in internal.h. Compiled without
// -fsanitize=thread: only kernel code is instrumented.
#include <sys/mman.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cuda_runtime.h"
#include "emu_ptx.h"
#include "internal.h"

// ---- fiber context switch (x86-64 System V) -------------------------------------------------
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack,
// stores the stack pointer in *save, loads `load` and restores the same from there. Much
// cheaper than swapcontext (no signal-mask system call), which matters: a kernel test does
// millions of switches.
#if !defined(__x86_64__)
#error "the cm3rt CUDA emulator's fiber switch is written for x86-64"
#endif
extern "C" void cm3rt_emu_switch(void** save, void* load);
asm(R"(
  .text
  .globl cm3rt_emu_switch
  .hidden cm3rt_emu_switch
  .type cm3rt_emu_switch,@function
cm3rt_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cm3rt_emu_switch,.-cm3rt_emu_switch
)");

namespace emu {

State& S() {
  static State s;
  return s;
}

DeviceProps& device_props() { return S().props; }
Stats& stats() { return S().stats; }
std::vector<std::string> launched_kernels() { return {S().launched.begin(), S().launched.end()}; }

std::string Fiber::where() const {
  const State& s = S();
  char buf[160];
  std::snprintf(buf, sizeof buf, "thread (%u,%u,%u) of block (%u,%u,%u)", tid.x, tid.y, tid.z,
                s.block.x, s.block.y, s.block.z);
  return buf;
}

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kPage = 4096;

// Stacks are mmap'd once and reused; a PROT_NONE page below each catches an overflow.
struct StackPool {
  std::vector<char*> stacks;
  char* get(size_t i) {
    while (stacks.size() <= i) {
      void* m = mmap(nullptr, kStackBytes + kPage, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (m == MAP_FAILED) throw Error("emu: cannot map a fiber stack");
      mprotect(m, kPage, PROT_NONE);
      stacks.push_back(static_cast<char*>(m) + kPage);
    }
    return stacks[i];
  }
};
StackPool& stacks() {
  static StackPool p;
  return p;
}

[[noreturn]] void fiber_entry() {
  State& s = S();
  s.invoke(s.params);
  Fiber& f = *s.cur;
  ++f.in_runtime;
  finish_async_copies(f);  // copies in flight at exit still land
  thread_exited(f);
  cm3rt_emu_switch(&f.sp, s.sched_sp);
  std::abort();  // never resumed
}

void init_fiber(Fiber& f, char* stack) {
  f.stack_lo = stack;
  f.stack_hi = stack + kStackBytes;
  auto top = reinterpret_cast<uintptr_t>(f.stack_hi) & ~uintptr_t(15);
  auto* w = reinterpret_cast<uint64_t*>(top);
  w[-1] = 0;                                               // fake return address of entry
  w[-2] = reinterpret_cast<uint64_t>(&fiber_entry);        // `ret` of the first switch
  for (int i = 3; i <= 8; ++i) w[-i] = 0;                  // rbp rbx r12 r13 r14 r15
  w[-9] = 0x1F80 | (uint64_t(0x037F) << 32);               // MXCSR, x87 control word
  f.sp = &w[-9];
}

}  // namespace

// Back to the scheduler; returns when this fiber is scheduled again.
void block_current() {
  State& s = S();
  ++s.stats.switches;
  cm3rt_emu_switch(&s.cur->sp, s.sched_sp);
}

// A finding that stops the launch at once (an access that must not happen).
[[noreturn]] void abort_launch(const std::string& msg) {
  State& s = S();
  if (s.cur) ++s.cur->in_runtime;
  s.fatal = msg;
  cm3rt_emu_switch(&s.cur->sp, s.sched_sp);
  std::abort();  // never resumed
}

// Keeps the first few findings of each detector (the prefix before ':'), counts the rest.
void report(const std::string& msg) {
  State& s = S();
  const std::string kind = msg.substr(0, msg.find(':'));
  int same = 0;
  for (const std::string& f : s.findings) same += f.compare(0, kind.size() + 1, kind + ":") == 0;
  if (same < 3) s.findings.push_back(msg);
  else ++s.more_findings;
}

std::string Site::str() const {
  const char* slash = std::strrchr(file, '/');
  return std::string(slash ? slash + 1 : file) + ":" + std::to_string(line);
}

const char* kernel_name_of(const char* pretty) {
  // g++: "void cm3rt::cuda::launch(...) [with auto Kernel = NAME; Args = {...}]"
  static thread_local std::string name;
  const char* k = std::strstr(pretty, "Kernel = ");
  if (!k) return pretty;
  k += 9;
  const char* e = std::strstr(k, "; Args");
  if (!e) e = std::strchr(k, ']');
  name.assign(k, e ? size_t(e - k) : std::strlen(k));
  return name.c_str();
}

uint3 thread_idx() { return S().cur->tid; }
uint3 block_idx() { return S().block; }
uint3 block_dim() { return S().bdim; }
uint3 grid_dim() { return S().gdim; }
void* dynamic_smem() { return S().dyn; }

// ---- barriers -------------------------------------------------------------------------------
namespace {

// Completes the CTA barrier when every live thread waits at it.
void try_complete_cta_barrier() {
  State& s = S();
  if (s.cta_waiting == 0 || s.cta_waiting < s.live) return;
  // Every live thread is here: check that they all came from the same call site.
  const Fiber* first = nullptr;
  for (Fiber& f : s.fibers) {
    if (f.state != Fiber::kCtaBarrier) continue;
    if (!first) first = &f;
    else if (f.bar_site != first->bar_site && !s.divergence_reported) {
      s.divergence_reported = true;
      report("synccheck: divergent __syncthreads in " + s.kernel + ": " + first->where() +
             " waits at " + first->bar_site.str() + ", " + f.where() + " at " + f.bar_site.str());
    }
  }
  // Threads that exited never reach this barrier: the hardware would let the rest pass, but
  // the CUDA programming model calls such a barrier divergent (undefined behaviour).
  if (s.live < int(s.fibers.size()) && !s.divergence_reported) {
    s.divergence_reported = true;
    std::string gone;
    for (const Fiber& f : s.fibers)
      if (f.state == Fiber::kDone) {
        gone = f.where();
        break;
      }
    report("synccheck: __syncthreads at " + first->bar_site.str() + " in " + s.kernel +
           " is not reached by " + gone + " (it exited before)");
  }
  const int result = s.cta_or;
  for (Fiber& f : s.fibers)
    if (f.state == Fiber::kCtaBarrier) {
      f.state = Fiber::kRunnable;
      f.bar_result = result;
      if (&f != s.cur) s.runnable.push_back(&f);  // the completing thread just continues
    }
  s.cta_waiting = 0;
  s.cta_or = 0;
  ++s.cta_epoch;  // racecheck: everything before is ordered before everything after
}

}  // namespace

int syncthreads_or(int pred, const char* file, int line) {
  State& s = S();
  Fiber& f = *s.cur;
  InRuntime scope(&f);
  f.bar_site = {file, line};
  f.state = Fiber::kCtaBarrier;
  s.cta_or |= pred ? 1 : 0;
  ++s.cta_waiting;
  try_complete_cta_barrier();
  if (f.state == Fiber::kCtaBarrier) block_current();
  return f.bar_result;
}

void syncthreads(const char* file, int line) { syncthreads_or(0, file, line); }

void thread_exited(Fiber& f) {
  State& s = S();
  f.state = Fiber::kDone;
  --s.live;
  try_complete_cta_barrier();
  // A lane that exits while its warp waits in a collective: the collective can never finish.
  const Warp& w = s.warps[f.linear / 32];
  if (w.arrived && (w.mask >> (f.linear % 32)) & 1u)  // (a lane that arrived is not running)
    abort_launch("synccheck: " + f.where() + " of " + s.kernel + " exited while its warp waits in " +
                 w.op + " at " + w.site.str() + " with it in the mask");
}

// ---- warp collectives -------------------------------------------------------------------------
// Every lane of `mask` arrives with 64 bits of input; the last one to arrive computes every
// lane's output with `combine`, then all continue. User barriers (__syncwarp) also advance
// the warp's racecheck epoch; shuffles, ballots, ldmatrix and mma do not order memory.
namespace {

template <typename Combine>
uint64_t warp_collective(const char* op, Site where, unsigned mask, uint64_t in, bool is_sync,
                         Combine combine) {
  State& s = S();
  Fiber& f = *s.cur;
  InRuntime scope(&f);
  const int lane = f.linear % 32;
  Warp& w = s.warps[f.linear / 32];
  if (!((mask >> lane) & 1u))
    abort_launch("synccheck: " + f.where() + " of " + s.kernel + " calls " + op + " at " + where.str() +
                 " with a mask that leaves out its own lane");
  if (w.arrived == 0) {
    w.mask = mask;
    w.op = op;
    w.site = where;
    // Lanes of the mask that do not exist or have exited can never arrive.
    for (int l = 0; l < 32; ++l) {
      if (!((mask >> l) & 1u)) continue;
      const int t = (f.linear / 32) * 32 + l;
      if (t >= int(s.fibers.size()) || s.fibers[t].state == Fiber::kDone)
        abort_launch("synccheck: " + std::string(op) + " at " + where.str() + " in " + s.kernel +
                     " names lane " + std::to_string(l) + " of warp " + std::to_string(f.linear / 32) +
                     " in its mask, but that lane " +
                     (t >= int(s.fibers.size()) ? "does not exist" : "has exited"));
    }
  } else if (w.mask != mask || w.op != op || w.site != where) {
    abort_launch("synccheck: divergent warp collective in " + s.kernel + ": " + f.where() +
                 " is at " + op + " " + where.str() + " while lanes of its warp wait at " + w.op +
                 " " + w.site.str());
  }
  w.in[lane] = in;
  w.arrived |= 1u << lane;
  if (w.arrived != w.mask) {
    f.state = Fiber::kWarpWait;
    block_current();
  } else {
    combine(w);
    for (int l = 0; l < 32; ++l)
      if (((w.mask >> l) & 1u) && l != lane) {
        Fiber& g = s.fibers[(f.linear / 32) * 32 + l];
        g.state = Fiber::kRunnable;
        s.runnable.push_back(&g);
      }
    w.arrived = 0;
    if (is_sync) ++w.epoch;
  }
  return w.out[lane];
}

}  // namespace

void syncwarp(unsigned mask, const char* file, int line) {
  warp_collective("__syncwarp", Site{file, line}, mask, 0, true, [](Warp&) {});
}

uint64_t shfl(uint64_t v, Shfl kind, int arg, unsigned mask, int width, const char* file,
              int line) {
  static const char* names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync",
                                "__shfl_xor_sync"};
  return warp_collective(names[int(kind)], Site{file, line}, mask, v, false, [&](Warp& w) {
    // PTX shfl.sync, CUDA's width w as c = ((32 - w) << 8) | (up ? 0 : 31): segments of w
    // lanes; a source lane j with !pval (up: below the segment; down, bfly: past its end)
    // leaves the lane's own value.
    for (int l = 0; l < 32; ++l) {
      if (!((w.mask >> l) & 1u)) continue;
      const int seg = l & ~(width - 1);
      int src = l;
      switch (kind) {
        case Shfl::kIdx: src = seg + (arg & (width - 1)); break;
        case Shfl::kUp: src = l - arg; if (src < seg) src = l; break;
        case Shfl::kDown: src = l + arg; if (src >= seg + width) src = l; break;
        // (bfly may reach an earlier segment, never a later one: pval = j <= maxLane)
        case Shfl::kXor: src = l ^ arg; if (src >= seg + width) src = l; break;
      }
      if (!((w.mask >> src) & 1u)) {
        // Reading a lane outside the mask is undefined: report it rather than invent a value.
        report("synccheck: " + std::string(names[int(kind)]) + " at " + w.site.str() + " in " +
               S().kernel + ": lane " + std::to_string(l) + " reads lane " + std::to_string(src) +
               ", which is not in the mask");
        src = l;
      }
      w.out[l] = w.in[src];
    }
  });
}

unsigned ballot(unsigned mask, int pred, const char* file, int line) {
  return unsigned(warp_collective("__ballot_sync", Site{file, line}, mask, pred ? 1 : 0, false,
                                  [](Warp& w) {
                                    unsigned b = 0;
                                    for (int l = 0; l < 32; ++l)
                                      if (((w.mask >> l) & 1u) && w.in[l]) b |= 1u << l;
                                    for (int l = 0; l < 32; ++l)  // (lanes outside the mask
                                      if ((w.mask >> l) & 1u) w.out[l] = b;  // may not have read theirs)
                                  }));
}

// ---- atomics --------------------------------------------------------------------------------
// Fibers switch only at barriers, so the read-modify-write is indivisible by construction.
template <typename T, typename Op>
static T atomic_rmw(T* p, T v, Op op) {
  check_access(p, sizeof(T), Access::kAtomic, __builtin_return_address(0));
  InRuntime scope(S().cur);
  const T old = *p;
  *p = op(old, v);
  return old;
}
int atomic_min_i32(int* p, int v) { return atomic_rmw(p, v, [](int a, int b) { return a < b ? a : b; }); }
unsigned long long atomic_min_u64(unsigned long long* p, unsigned long long v) {
  return atomic_rmw(p, v, [](auto a, auto b) { return a < b ? a : b; });
}
unsigned long long atomic_add_u64(unsigned long long* p, unsigned long long v) {
  return atomic_rmw(p, v, [](auto a, auto b) { return a + b; });
}
int atomic_add_i32(int* p, int v) { return atomic_rmw(p, v, [](int a, int b) { return a + b; }); }
float atomic_add_f32(float* p, float v) { return atomic_rmw(p, v, [](float a, float b) { return a + b; }); }

// ---- PTX models -------------------------------------------------------------------------------
namespace ptx {

void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  State& s = S();
  Fiber& f = *s.cur;
  void* pc = __builtin_return_address(0);
  if (reinterpret_cast<uintptr_t>(smem_dst) % 16)
    abort_launch("memcheck: cp.async destination " + hex(smem_dst) + " is not 16-byte aligned (" +
                 f.where() + " of " + s.kernel + ")");
  if (!is_shared(smem_dst, 16))
    abort_launch("memcheck: cp.async destination " + hex(smem_dst) + " is not in shared memory (" +
                 f.where() + " of " + s.kernel + ")");
  if (valid) {
    if (reinterpret_cast<uintptr_t>(gmem_src) % 16)
      abort_launch("memcheck: cp.async source " + hex(gmem_src) + " is not 16-byte aligned (" +
                   f.where() + " of " + s.kernel + ")");
    check_access(gmem_src, 16, Access::kRead, pc);
  }
  check_access(smem_dst, 16, Access::kAsyncIssue, pc);
  InRuntime scope(&f);
  f.open_copies.push_back({smem_dst, valid ? gmem_src : nullptr});
}

void cp_async_commit() {
  Fiber& f = *S().cur;
  InRuntime scope(&f);
  f.groups.push_back(std::move(f.open_copies));
  f.open_copies.clear();
}

static void land(Fiber& f, const std::vector<AsyncCopy>& group) {
  for (const AsyncCopy& c : group) {
    if (c.src) std::memcpy(c.dst, c.src, 16);
    else std::memset(c.dst, 0, 16);
    land_async(c.dst, f);
  }
}

void cp_async_wait(int n) {
  Fiber& f = *S().cur;
  InRuntime scope(&f);
  while (int(f.groups.size()) > n) {
    land(f, f.groups.front());
    f.groups.erase(f.groups.begin());
  }
}

}  // namespace ptx

void finish_async_copies(Fiber& f) {
  for (const auto& g : f.groups) ptx::land(f, g);
  ptx::land(f, f.open_copies);
  f.groups.clear();
  f.open_copies.clear();
}

namespace ptx {

void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row, bool trans) {
  State& s = S();
  Fiber& f = *s.cur;
  void* pc = __builtin_return_address(0);
  if (reinterpret_cast<uintptr_t>(smem_row) % 16)
    abort_launch("memcheck: ldmatrix row address " + hex(smem_row) + " is not 16-byte aligned (" +
                 f.where() + " of " + s.kernel + ")");
  if (!is_shared(smem_row, 16))
    abort_launch("memcheck: ldmatrix row address " + hex(smem_row) + " is not in shared memory (" +
                 f.where() + " of " + s.kernel + ")");
  // Each lane's 16-byte row is read by that lane (racecheck / initcheck attribute it so).
  check_access(smem_row, 16, Access::kRead, pc);
  InRuntime scope(&f);
  // Lanes 8i..8i+7 give the rows of matrix i. Without .trans lane l receives, in register i,
  // row l/4, elements 2(l%4) and 2(l%4)+1 of matrix i; with .trans the transpose's.
  warp_collective(trans ? "ldmatrix.x4.trans" : "ldmatrix.x4", Site{__FILE__, __LINE__},
                  0xffffffffu, reinterpret_cast<uint64_t>(smem_row), false, [&](Warp& w) {
                    auto elem = [&](int i, int row, int col) {
                      uint16_t v;
                      std::memcpy(&v, reinterpret_cast<const char*>(w.in[8 * i + row]) + 2 * col, 2);
                      return uint32_t(v);
                    };
                    for (int l = 0; l < 32; ++l) {
                      const int g = l / 4, t = l % 4;
                      for (int i = 0; i < 4; ++i) {
                        const uint32_t lo = trans ? elem(i, 2 * t, g) : elem(i, g, 2 * t);
                        const uint32_t hi = trans ? elem(i, 2 * t + 1, g) : elem(i, g, 2 * t + 1);
                        w.wide[l][i] = lo | (hi << 16);
                      }
                    }
                  });
  // The results stay in the warp until its next collective completes, which needs this lane.
  std::memcpy(r, s.warps[f.linear / 32].wide[f.linear % 32], 16);
}

float bf16_bits_to_float(uint32_t bits) {
  const uint32_t u = bits << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

float f16_bits_to_float(uint32_t h) {
  const uint32_t sign = (h >> 15) & 1u, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  float v;
  if (exp == 0) v = std::ldexp(float(man), -24);
  else if (exp == 31) v = man ? NAN : INFINITY;
  else v = std::ldexp(float(man | 0x400u), int(exp) - 25);
  return sign ? -v : v;
}

void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, MmaType t) {
  State& s = S();
  Fiber& f = *s.cur;
  InRuntime scope(&f);
  // Inputs per lane: a0..a3, b0, b1, c0..c3 (PTX ISA, "Matrix Fragments for mma.m16n8k16").
  struct In { uint32_t a[4], b[2]; float c[4]; };
  In mine{{a[0], a[1], a[2], a[3]}, {b0, b1}, {d[0], d[1], d[2], d[3]}};
  warp_collective("mma.m16n8k16", Site{__FILE__, __LINE__}, 0xffffffffu,
                  reinterpret_cast<uint64_t>(&mine), false, [&](Warp& w) {
    auto in = [&](int lane) { return reinterpret_cast<const In*>(w.in[lane]); };
    auto half = [&](uint32_t reg, int hi) {
      const uint32_t bits = hi ? reg >> 16 : reg & 0xffffu;
      return t == MmaType::kBF16 ? bf16_bits_to_float(bits) : f16_bits_to_float(bits);
    };
    // A (16x16, row): row g + 8*(i%2), cols 2t + 8*(i/2) + {0,1} in a_i of lane 4g + t.
    auto A = [&](int r, int c) {
      const int lane = (r % 8) * 4 + (c % 8) / 2, reg = (r / 8) + 2 * (c / 8);
      return half(in(lane)->a[reg], c % 2);
    };
    // B (16x8, col): k 2t + 8*j + {0,1}, n g in b_j of lane 4g + t.
    auto B = [&](int k, int n) {
      const int lane = n * 4 + (k % 8) / 2;
      return half(in(lane)->b[k / 8], k % 2);
    };
    // C/D (16x8 fp32): c_i of lane 4g + t holds row g + 8*(i/2), col 2t + i%2.
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane / 4, tt = lane % 4;
      for (int i = 0; i < 4; ++i) {
        const int r = g + 8 * (i / 2), c = 2 * tt + i % 2;
        // The products of 16-bit inputs are exact in fp32; the hardware adds them with
        // at least fp32 precision. A double sum rounded once is within that.
        double acc = in(lane)->c[i];
        for (int k = 0; k < 16; ++k) acc += double(A(r, k)) * double(B(k, c));
        const float v = float(acc);
        std::memcpy(&w.wide[lane][i], &v, 4);
      }
    }
  });
  std::memcpy(d, s.warps[f.linear / 32].wide[f.linear % 32], 16);
}

}  // namespace ptx

// ---- launch -----------------------------------------------------------------------------------
namespace {

cudaError_t g_last_error = cudaSuccess;
std::string g_last_error_msg;

void launch_error(const std::string& msg) {
  g_last_error = cudaErrorInvalidConfiguration;
  g_last_error_msg = msg;
}

}  // namespace

cudaError_t set_max_dynamic_smem(const void* kernel, int bytes) {
  if (bytes < 0 || bytes > S().props.max_smem_optin) {
    g_last_error = cudaErrorInvalidValue;
    g_last_error_msg = "cudaFuncSetAttribute: " + std::to_string(bytes) +
                       " bytes of dynamic shared memory exceed the device's opt-in limit";
    return cudaErrorInvalidValue;
  }
  S().smem_limit[kernel] = size_t(bytes);
  return cudaSuccess;
}

void launch(const char* kernel, const void* kernel_fn, dim3 grid, dim3 block, size_t smem,
            void* params, size_t params_bytes, void (*invoke)(void*)) {
  State& s = S();
  if (s.cur) throw Error("emu: a kernel launched from inside a kernel");
  const unsigned long long nthreads = 1ull * block.x * block.y * block.z;
  const std::string name = kernel;
  if (nthreads == 0 || nthreads > 1024 || block.z > 64)
    return launch_error(name + ": block (" + std::to_string(block.x) + "," + std::to_string(block.y) +
                        "," + std::to_string(block.z) + ") is not a valid CUDA block");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 ||
      grid.x > 2147483647u)
    return launch_error(name + ": grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) +
                        "," + std::to_string(grid.z) + ") is not a valid CUDA grid");
  if (smem > 48 * 1024) {
    auto it = s.smem_limit.find(kernel_fn);
    if (it == s.smem_limit.end() || it->second < smem)
      return launch_error(name + ": " + std::to_string(smem) +
                          " bytes of dynamic shared memory without cudaFuncSetAttribute");
  }
  if (smem > size_t(s.props.max_smem_optin))
    return launch_error(name + ": dynamic shared memory beyond the device limit");

  s.kernel = name;
  s.launched.insert(name);
  s.params = params;
  s.params_lo = static_cast<char*>(params);
  s.params_hi = s.params_lo + params_bytes;
  s.invoke = invoke;
  s.gdim = {grid.x, grid.y, grid.z};
  s.bdim = {block.x, block.y, block.z};
  s.dyn_bytes = smem;
  s.findings.clear();
  s.more_findings = 0;
  s.fatal.clear();
  ++s.stats.launches;
  const int n = int(nthreads), nwarps = (n + 31) / 32;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        s.block = {bx, by, bz};
        begin_block();  // checker: new shadow generation, dynamic smem poisoned
        s.fibers.assign(n, Fiber{});
        s.warps.assign(nwarps, Warp{});
        s.runnable.clear();
        for (int i = 0; i < n; ++i) {
          Fiber& f = s.fibers[i];
          f.linear = i;
          f.tid = {unsigned(i) % block.x, (unsigned(i) / block.x) % block.y,
                   unsigned(i) / (block.x * block.y)};
          init_fiber(f, stacks().get(i));
        }
        // Run thread 0 first, then 1, ...: each runs until it waits.
        for (int i = n - 1; i >= 0; --i) s.runnable.push_back(&s.fibers[i]);
        s.live = n;
        s.cta_waiting = 0;
        s.cta_or = 0;
        s.divergence_reported = false;
        ++s.stats.blocks;
        s.stats.threads += n;
        while (!s.runnable.empty()) {
          Fiber* f = s.runnable.back();
          s.runnable.pop_back();
          s.cur = f;
          cm3rt_emu_switch(&s.sched_sp, f->sp);
          s.cur = nullptr;
          if (!s.fatal.empty()) break;
        }
        if (s.fatal.empty() && s.live > 0) {
          std::string who;
          for (const Fiber& f : s.fibers)
            if (f.state != Fiber::kDone) {
              who = f.where() + (f.state == Fiber::kCtaBarrier ? " at __syncthreads " + f.bar_site.str()
                                                               : " in a warp collective");
              break;
            }
          s.fatal = "synccheck: deadlock in " + s.kernel + ": " + std::to_string(s.live) +
                    " threads wait forever, e.g. " + who;
        }
        if (!s.fatal.empty()) {
          s.fibers.clear();
          const std::string msg = s.fatal;
          s.fatal.clear();
          throw Error("cuda emulator: " + msg);
        }
      }
  s.fibers.clear();
  if (!s.findings.empty()) {
    std::string msg = "cuda emulator: " + std::to_string(s.findings.size() + s.more_findings) +
                      " finding(s) in " + s.kernel + " (the first of each kind):";
    for (const std::string& f : s.findings) msg += "\n  " + f;
    if (s.more_findings) msg += "\n  ... and " + std::to_string(s.more_findings) + " more";
    throw Error(msg);
  }
}

}  // namespace emu

// ---- the CUDA runtime API shim ---------------------------------------------------------------
cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::g_last_error;
  emu::g_last_error = cudaSuccess;
  return e;
}
const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : emu::g_last_error_msg.c_str();
}
cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? emu::S().props.sm_count : emu::S().props.max_smem_optin;
  return cudaSuccess;
}
// Emulated device memory is host memory.
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}
