// The emulator's checker: every memory access of kernel code comes here, through the
// __tsan_* hooks that g++ -fsanitize=thread puts before each load and store of the kernel
// translation units (this file defines them: no TSan runtime is linked), and through the
// PTX models (cp.async, ldmatrix) and atomics of runtime.cpp.
//
// An access of an emulated thread is classified by address:
//   its own fiber stack              locals: not checked;
//   the launch's parameter block     the kernel arguments: allowed;
//   the block's dynamic shared memory [dyn, dyn + size): shared checks; the rest of the
//                                    shared window beyond `size` is out of bounds;
//   the module's writable data       static __shared__ variables (kernels have no other
//                                    globals): shared checks;
//   the module's read-only data      constant tables: reads allowed;
//   a registered buffer              global memory of the call: allowed;
//   anything else                    memcheck finding; the launch stops before the access.
// Shared checks keep a 16-byte shadow per byte of shared memory: which thread wrote it last
// and which read it, each with the barrier epoch of the access; a block generation number
// makes every byte "never written" at the start of each block without clearing the shadow.
#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>

#include <cstdio>
#include <cstring>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "internal.h"

namespace emu {

std::string hex(const void* p) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%p", p);
  return buf;
}

// "file:line" of a code address in the kernels (they are compiled with -g1), via addr2line
// when it is installed, else the module offset. Only called for findings.
std::string code_at(const void* pc) {
  static std::map<const void*, std::string> cache;
  auto it = cache.find(pc);
  if (it != cache.end()) return it->second;
  Dl_info info{};
  std::string out = hex(pc);
  if (dladdr(pc, &info) && info.dli_fname) {
    char off[32];
    // The return address points after the access's call: step back into it.
    std::snprintf(off, sizeof off, "0x%lx",
                  static_cast<unsigned long>(static_cast<const char*>(pc) - 1 -
                                             static_cast<const char*>(info.dli_fbase)));
    out = std::string(info.dli_fname) + "+" + off;
    const std::string cmd = "addr2line -e '" + std::string(info.dli_fname) + "' " + off + " 2>/dev/null";
    if (FILE* f = popen(cmd.c_str(), "r")) {
      char line[512] = {};
      if (std::fgets(line, sizeof line, f) && line[0] != '?') {
        std::string where(line);
        while (!where.empty() && (where.back() == '\n' || where.back() == ' ')) where.pop_back();
        const size_t disc = where.find(" (discriminator");
        if (disc != std::string::npos) where.resize(disc);
        const size_t slash = where.rfind('/');
        if (slash != std::string::npos) where = where.substr(slash + 1);
        out = where;
      }
      pclose(f);
    }
  }
  return cache[pc] = out;
}

namespace {

struct Region {
  char* lo = nullptr;
  char* hi = nullptr;
  bool contains(const void* p, size_t n) const {
    auto c = static_cast<const char*>(p);
    return c >= lo && c + n <= hi;
  }
};

// One byte of shared memory. Thread ids are linear ids < 1024; the special values below.
struct Shadow {
  uint32_t gen;     // block generation the rest belongs to (else: never written this block)
  uint16_t w_tid;   // last writer | kPending while a cp.async into it is in flight
  uint16_t r_tid;   // a reader since that write, or kMany
  uint32_t w_ep;    // epoch of the write: __syncthreads count << 12 | the writer's warp's __syncwarp count
  uint32_t r_ep;
};
// kWarpReaders | w: several readers, all in warp w (a __syncwarp of w orders them all).
constexpr uint16_t kNone = 0xffff, kAtomic = 0xfffe, kMany = 0xfffd, kPending = 0x4000,
                   kWarpReaders = 0x8000;
static_assert(sizeof(Shadow) == 16, "shadow entry");

constexpr size_t kWindow = 256 * 1024;  // >= the largest dynamic shared memory (227 KiB)

struct Checker {
  Region window;          // the dynamic shared memory window (the first dyn_bytes are valid)
  Region statics;         // the module's writable data: static __shared__ variables
  // The function-local statics of the module ("_ZZ..." symbols: every __shared__ variable),
  // sorted by address, from its symbol table: a static shared access must stay inside one.
  struct Var { char* lo; char* hi; std::string name; };
  std::vector<Var> vars;
  std::vector<Region> consts;  // the module's read-only data
  Shadow* window_shadow = nullptr;
  Shadow* static_shadow = nullptr;
  uint32_t gen = 0;
  // A registered global buffer. `writer` (one entry per byte, mapped lazily) holds the launch
  // and the block that last wrote the byte: the cross-block racecheck of global memory.
  struct Writer { uint32_t launch, block; };
  struct Buf { const char* base; size_t bytes; std::string name; int id; Writer* writer; };
  std::vector<Buf> buffers;  // few per call: a linear search is fine
  int next_id = 1;

  Checker() {
    void* m = mmap(nullptr, kWindow, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    window = {static_cast<char*>(m), static_cast<char*>(m) + kWindow};
    window_shadow = alloc_shadow(kWindow);
    find_module_segments();
    static_shadow = alloc_shadow(size_t(statics.hi - statics.lo));
    find_shared_variables();
  }

  void find_shared_variables() {
    Dl_info info{};
    if (!dladdr(reinterpret_cast<void*>(&hex), &info) || !info.dli_fname) return;
    const int fd = open(info.dli_fname, O_RDONLY);
    if (fd < 0) return;
    struct stat st{};
    fstat(fd, &st);
    void* m = mmap(nullptr, size_t(st.st_size), PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (m == MAP_FAILED) return;
    const auto* base = static_cast<const char*>(m);
    const auto* eh = reinterpret_cast<const ElfW(Ehdr)*>(base);
    const auto* sh = reinterpret_cast<const ElfW(Shdr)*>(base + eh->e_shoff);
    // A shared object's symbols are relative to its load address; an executable's absolute.
    const uintptr_t load = eh->e_type == ET_DYN ? reinterpret_cast<uintptr_t>(info.dli_fbase) : 0;
    for (int i = 0; i < eh->e_shnum; ++i) {
      if (sh[i].sh_type != SHT_SYMTAB) continue;
      const auto* syms = reinterpret_cast<const ElfW(Sym)*>(base + sh[i].sh_offset);
      const char* names = base + sh[sh[i].sh_link].sh_offset;
      for (size_t k = 0; k < sh[i].sh_size / sizeof(ElfW(Sym)); ++k) {
        const ElfW(Sym)& y = syms[k];
        const char* name = names + y.st_name;
        if (ELF64_ST_TYPE(y.st_info) != STT_OBJECT || y.st_size == 0 || std::strncmp(name, "_ZZ", 3))
          continue;
        char* lo = reinterpret_cast<char*>(load + y.st_value);
        if (!statics.contains(lo, y.st_size)) continue;
        int status = 0;
        char* pretty = abi::__cxa_demangle(name, nullptr, nullptr, &status);
        vars.push_back({lo, lo + y.st_size, status == 0 ? pretty : name});
        std::free(pretty);
      }
    }
    munmap(m, size_t(st.st_size));
    std::sort(vars.begin(), vars.end(), [](const Var& a, const Var& b) { return a.lo < b.lo; });
  }

  // The __shared__ variable holding [p, p + n), or nullptr; `near` gets the closest one.
  const Var* shared_var(const char* p, size_t n, const Var** near) const {
    auto it = std::upper_bound(vars.begin(), vars.end(), p,
                               [](const char* a, const Var& v) { return a < v.lo; });
    const Var* before = it == vars.begin() ? nullptr : &*(it - 1);
    const Var* after = it == vars.end() ? nullptr : &*it;
    if (before && p + n <= before->hi) return before;
    *near = !before ? after : !after ? before : (p - before->hi < after->lo - p ? before : after);
    return nullptr;
  }

  static Shadow* alloc_shadow(size_t bytes) {
    // Untouched pages cost nothing; gen 0 (never written) is what fresh pages hold.
    void* m = mmap(nullptr, bytes * sizeof(Shadow), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) throw Error("emu: cannot map the shared-memory shadow");
    return static_cast<Shadow*>(m);
  }

  // The PT_LOAD segments of the object this code is linked into (cm3rt._emu or a test).
  void find_module_segments() {
    Dl_info info{};
    dladdr(reinterpret_cast<void*>(&hex), &info);
    struct Ctx { void* base; Checker* self; } ctx{info.dli_fbase, this};
    dl_iterate_phdr(
        [](dl_phdr_info* i, size_t, void* p) {
          auto* c = static_cast<Ctx*>(p);
          bool mine = false;
          for (int k = 0; k < i->dlpi_phnum; ++k)
            if (i->dlpi_phdr[k].p_type == PT_LOAD &&
                reinterpret_cast<void*>(i->dlpi_addr + i->dlpi_phdr[k].p_vaddr -
                                        i->dlpi_phdr[k].p_offset) == c->base)
              mine = true;
          if (!mine && reinterpret_cast<void*>(i->dlpi_addr) != c->base) return 0;
          for (int k = 0; k < i->dlpi_phnum; ++k) {
            const ElfW(Phdr)& ph = i->dlpi_phdr[k];
            if (ph.p_type != PT_LOAD) continue;
            char* lo = reinterpret_cast<char*>(i->dlpi_addr + ph.p_vaddr);
            char* hi = lo + ph.p_memsz;
            if (ph.p_flags & PF_W) {
              if (!c->self->statics.lo || lo < c->self->statics.lo) c->self->statics.lo = lo;
              if (hi > c->self->statics.hi) c->self->statics.hi = hi;
            } else if (!(ph.p_flags & PF_X)) {
              c->self->consts.push_back({lo, hi});
            }
          }
          return 1;
        },
        &ctx);
  }

  Shadow* shadow_of(const char* p) {
    if (window.contains(p, 1)) return &window_shadow[p - window.lo];
    return &static_shadow[p - statics.lo];
  }
};

Checker& C() {
  static Checker c;
  return c;
}

uint32_t epoch_of(const State& s, int tid) {
  return (s.cta_epoch << 12) | (s.warps[tid / 32].epoch & 0xfffu);
}

// Is an access of thread `a` at epoch `ep` ordered before the current thread's access now?
bool ordered(const State& s, int me, uint16_t a, uint32_t ep) {
  if (a == me) return true;
  if ((ep >> 12) != s.cta_epoch) return true;  // a __syncthreads completed since
  if (a == kAtomic || a == kMany) return false;
  const int warp = (a & 0xff00) == kWarpReaders ? (a & 0xff) : a / 32;
  return warp == me / 32 && (ep & 0xfffu) != (s.warps[me / 32].epoch & 0xfffu);  // __syncwarp
}

std::string describe(const State& s, const Fiber& f, const char* what, const void* addr,
                     size_t n) {
  return std::string(what) + " of " + std::to_string(n) + " bytes at " + hex(addr) + " by " +
         f.where() + " in " + s.kernel;
}

std::string tid_name(const State& s, uint16_t t) {
  if (t == kAtomic) return "an atomic";
  if (t == kMany) return "several threads";
  if ((t & 0xff00) == kWarpReaders) return "several threads of warp " + std::to_string(t & 0xff);
  return s.fibers[t].where();
}

std::string shared_offset(const char* p) {
  Checker& c = C();
  if (c.window.contains(p, 1))
    return "dynamic shared memory + " + std::to_string(p - c.window.lo);
  return "static shared memory";
}

void check_shared(State& s, Fiber& f, const char* p, size_t n, Access kind, void* pc) {
  Checker& c = C();
  InRuntime scope(&f);
  const int me = f.linear;
  const uint32_t ep = epoch_of(s, me);
  for (size_t i = 0; i < n; ++i) {
    Shadow& sh = *c.shadow_of(p + i);
    const bool fresh = sh.gen != c.gen;
    auto at = [&] { return " (" + shared_offset(p + i) + ", at " + code_at(pc) + ")"; };
    if (kind == Access::kRead || kind == Access::kAtomic) {
      if (fresh) {
        report("initcheck: " + describe(s, f, kind == Access::kRead ? "read" : "atomic", p, n) +
               " reads shared memory this block never wrote" + at());
        // From here on the bytes count as seen (one report each); the read is recorded
        // below, so a later unordered write by another thread is still a race.
        for (size_t k = i; k < n; ++k) {
          Shadow& z = *c.shadow_of(p + k);
          if (z.gen != c.gen) z = Shadow{c.gen, kNone, kNone, 0, 0};
        }
      }
      if (sh.w_tid != kNone && (sh.w_tid & kPending) && sh.w_tid != kAtomic && sh.w_tid != kMany) {
        report("racecheck: " + describe(s, f, "read", p, n) +
               " reads a cp.async destination of " + s.fibers[sh.w_tid & ~kPending].where() +
               " before its cp.async.wait_group" + at());
        return;
      }
      if (sh.w_tid != kNone && !ordered(s, me, sh.w_tid, sh.w_ep) &&
          !(kind == Access::kAtomic && sh.w_tid == kAtomic)) {
        report("racecheck: " + describe(s, f, kind == Access::kRead ? "read" : "atomic", p, n) +
               " races with a write by " + tid_name(s, sh.w_tid) +
               " (no __syncthreads / __syncwarp between)" + at());
        return;
      }
    }
    if (kind == Access::kRead) {
      if (sh.r_tid == kNone || ordered(s, me, sh.r_tid, sh.r_ep)) {
        sh.r_tid = uint16_t(me);
      } else if (sh.r_tid != me && sh.r_tid != kMany) {
        const int warp = (sh.r_tid & 0xff00) == kWarpReaders ? (sh.r_tid & 0xff) : sh.r_tid / 32;
        sh.r_tid = warp == me / 32 ? uint16_t(kWarpReaders | warp) : kMany;
      }
      sh.r_ep = ep;
      continue;
    }
    // a write (plain, atomic, or a cp.async issued)
    if (!fresh) {
      if (kind != Access::kAtomic && sh.w_tid != kNone && !ordered(s, me, sh.w_tid & ~kPending, sh.w_ep)) {
        report("racecheck: " + describe(s, f, "write", p, n) + " races with a write by " +
               tid_name(s, sh.w_tid & ~kPending) + " (no __syncthreads / __syncwarp between)" + at());
        return;
      }
      if (sh.r_tid != kNone && !ordered(s, me, sh.r_tid, sh.r_ep)) {
        report("racecheck: " + describe(s, f, kind == Access::kAtomic ? "atomic" : "write", p, n) +
               " races with a read by " + tid_name(s, sh.r_tid) +
               " (no __syncthreads / __syncwarp between)" + at());
        return;
      }
    }
    sh.gen = c.gen;
    sh.w_tid = kind == Access::kAtomic ? kAtomic
               : kind == Access::kAsyncIssue ? uint16_t(me | kPending) : uint16_t(me);
    sh.w_ep = ep;
    sh.r_tid = kNone;
  }
}

[[noreturn]] void out_of_bounds(State& s, Fiber& f, const char* p, size_t n, Access kind,
                                void* pc) {
  Checker& c = C();
  ++f.in_runtime;
  const char* what = kind == Access::kRead ? "read" : kind == Access::kAtomic ? "atomic" : "write";
  std::string msg = "memcheck: invalid " + describe(s, f, what, p, n) + " (at " + code_at(pc) + "): ";
  if (c.window.contains(p, 1)) {
    msg += "dynamic shared memory + " + std::to_string(p - c.window.lo) + ", beyond the " +
           std::to_string(s.dyn_bytes) + " bytes the launch gave";
    abort_launch(msg);
  }
  // The nearest registered buffer, for the message.
  const char* best = nullptr;
  long long dist = 0;  // bytes outside the buffer
  std::string name;
  size_t best_bytes = 0;
  for (const auto& b : c.buffers) {
    const long long d = p < b.base ? b.base - p : p - (b.base + b.bytes) + 1;
    if (!best || std::llabs(d) < std::llabs(dist)) {
      best = b.base;
      best_bytes = b.bytes;
      dist = d;
      name = b.name;
    }
  }
  if (best) {
    msg += "byte offset " + std::to_string(p - best) + " of '" + name + "' (" +
           std::to_string(best_bytes) + " bytes at " + hex(best) + "), the nearest buffer";
  } else {
    msg += "no buffer is registered for this launch";
  }
  abort_launch(msg);
}

}  // namespace

bool is_shared(const void* addr, size_t n) {
  const State& s = S();
  Checker& c = C();
  auto p = static_cast<const char*>(addr);
  return (p >= c.window.lo && p + n <= c.window.lo + s.dyn_bytes) || c.statics.contains(p, n);
}

void begin_block() {
  State& s = S();
  Checker& c = C();
  ++c.gen;
  s.dyn = reinterpret_cast<unsigned char*>(c.window.lo);
  std::memset(c.window.lo, 0xff, s.dyn_bytes);  // poison: a stray read sees NaN / -1
  s.cta_epoch = 0;
}

void land_async(void* dst, const Fiber& f) {
  Checker& c = C();
  auto p = static_cast<char*>(dst);
  for (int i = 0; i < 16; ++i) {
    Shadow& sh = *c.shadow_of(p + i);
    if (sh.gen == c.gen && sh.w_tid == uint16_t(f.linear | kPending)) sh.w_tid = uint16_t(f.linear);
  }
}

namespace {

// Blocks of one launch are unordered (no kernel here synchronises the grid): a byte of
// global memory one block writes must not be written or read by another block of the same
// launch (atomics excepted). Blocks run one after another here, so the later block is the
// one that would see the other's value or lose its own on a GPU. Reads before a write in
// another block are not tracked (write-after-read across blocks is not seen).
void check_global_race(State& s, Fiber& f, const Checker::Buf& b, const char* p, size_t n,
                       Access kind, void* pc) {
  if (kind == Access::kAtomic || !b.writer) return;
  const uint32_t launch = uint32_t(s.stats.launches);
  const uint32_t block = 1 + s.block.x + s.gdim.x * (s.block.y + s.gdim.y * s.block.z);
  for (size_t i = 0; i < n; ++i) {
    Checker::Writer& w = b.writer[p + i - b.base];
    if (w.launch == launch && w.block != block) {
      const uint32_t o = w.block - 1;
      const std::string other = "block (" + std::to_string(o % s.gdim.x) + "," +
                                std::to_string(o / s.gdim.x % s.gdim.y) + "," +
                                std::to_string(o / (s.gdim.x * s.gdim.y)) + ")";
      report("racecheck: " + describe(s, f, kind == Access::kRead ? "read" : "write", p, n) +
             " (global, byte offset " + std::to_string(p - b.base) + " of '" + b.name +
             "') touches a byte that " + other + " wrote in the same launch (at " + code_at(pc) +
             ")");
      return;
    }
    if (kind != Access::kRead) w = {launch, block};
  }
}

}  // namespace

void check_access(const void* addr, size_t n, Access kind, void* pc) {
  State& s = S();
  Fiber* f = s.cur;
  if (!f || f->in_runtime) return;  // host code, or the emulator's own
  auto p = static_cast<const char*>(addr);
  if (p >= f->stack_lo && p + n <= f->stack_hi) return;
  InRuntime scope(f);  // what the checker itself runs (messages, ...) is not the kernel's
  ++s.stats.checked_accesses;
  if (p >= s.params_lo && p + n <= s.params_hi) return;
  Checker& c = C();
  if (c.window.contains(p, n)) {
    if (p + n > c.window.lo + s.dyn_bytes) out_of_bounds(s, *f, p, n, kind, pc);
    return check_shared(s, *f, p, n, kind, pc);
  }
  if (c.statics.contains(p, n)) {
    const Checker::Var* near = nullptr;
    if (!c.vars.empty() && !c.shared_var(p, n, &near)) {
      const char* what = kind == Access::kRead ? "read" : kind == Access::kAtomic ? "atomic" : "write";
      const long long off = near ? (p - near->lo) : 0;
      abort_launch("memcheck: invalid " + describe(s, *f, what, p, n) + " (at " + code_at(pc) +
                   "): static shared memory outside every __shared__ variable" +
                   (near ? ", byte offset " + std::to_string(off) + " of " + near->name + " (" +
                               std::to_string(near->hi - near->lo) + " bytes)"
                         : std::string()));
    }
    return check_shared(s, *f, p, n, kind, pc);
  }
  if (kind == Access::kRead)
    for (const Region& r : c.consts)
      if (r.contains(p, n)) return;
  for (const auto& b : c.buffers)
    if (p >= b.base && p + n <= b.base + b.bytes) {
      if (n == 16 && reinterpret_cast<uintptr_t>(p) % 16)
        abort_launch("memcheck: misaligned " + describe(s, *f, kind == Access::kRead ? "read" : "write", p, n) +
                     " (a 16-byte access must be 16-byte aligned; at " + code_at(pc) + ")");
      check_global_race(s, *f, b, p, n, kind, pc);
      return;
    }
  out_of_bounds(s, *f, p, n, kind, pc);
}

int register_buffer(const void* base, size_t bytes, const std::string& name) {
  Checker& c = C();
  const int id = c.next_id++;
  if (bytes) {
    void* m = mmap(nullptr, bytes * sizeof(Checker::Writer), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    auto* writer = m == MAP_FAILED ? nullptr : static_cast<Checker::Writer*>(m);
    c.buffers.push_back({static_cast<const char*>(base), bytes, name, id, writer});
  }
  return id;
}

void unregister_buffer(int id) {
  auto& v = C().buffers;
  for (size_t i = 0; i < v.size(); ++i)
    if (v[i].id == id) {
      if (v[i].writer) munmap(v[i].writer, v[i].bytes * sizeof(Checker::Writer));
      v.erase(v.begin() + long(i));
      return;
    }
}

}  // namespace emu

// ---- the instrumentation hooks g++ -fsanitize=thread calls -------------------------------------
#define EMU_HOOK(kind, n, K)                                                    \
  extern "C" void __tsan_##kind##n(void* a) {                                   \
    if (emu::S().cur) emu::check_access(a, n, K, __builtin_return_address(0));  \
  }                                                                             \
  extern "C" void __tsan_unaligned_##kind##n(void* a) {                         \
    if (emu::S().cur) emu::check_access(a, n, K, __builtin_return_address(0));  \
  }
EMU_HOOK(read, 1, emu::Access::kRead)
EMU_HOOK(read, 2, emu::Access::kRead)
EMU_HOOK(read, 4, emu::Access::kRead)
EMU_HOOK(read, 8, emu::Access::kRead)
EMU_HOOK(read, 16, emu::Access::kRead)
EMU_HOOK(write, 1, emu::Access::kWrite)
EMU_HOOK(write, 2, emu::Access::kWrite)
EMU_HOOK(write, 4, emu::Access::kWrite)
EMU_HOOK(write, 8, emu::Access::kWrite)
EMU_HOOK(write, 16, emu::Access::kWrite)
extern "C" void __tsan_read_range(void* a, unsigned long n) {
  if (emu::S().cur) emu::check_access(a, n, emu::Access::kRead, __builtin_return_address(0));
}
extern "C" void __tsan_write_range(void* a, unsigned long n) {
  if (emu::S().cur) emu::check_access(a, n, emu::Access::kWrite, __builtin_return_address(0));
}
extern "C" void __tsan_init() {}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
extern "C" void __tsan_vptr_update(void**, void*) {}
extern "C" void __tsan_vptr_read(void**) {}
// Atomics of host code in the instrumented units (e.g. the guard of a function-local static's
// one-time initialisation): performed, not checked.
extern "C" char __tsan_atomic8_load(const volatile char* a, int) {
  return __atomic_load_n(a, __ATOMIC_SEQ_CST);
}
