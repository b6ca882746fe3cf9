#include "emu.h"

namespace emu {

State& S() {
  static State s;
  return s;
}

void yield() {
  State& s = S();
  swapcontext(&s.cur->ctx, &s.sched);
}

void barrier_wait(Barrier& b) {
  const long g = b.gen;
  if (++b.arrived == b.count) {
    b.arrived = 0;
    ++b.gen;
    ++S().progress;
    return;
  }
  while (b.gen == g) yield();
}

bool in_smem(const void* p, size_t n) {
  const State& s = S();
  auto c = static_cast<const unsigned char*>(p);
  return c >= s.dyn_smem && c + n <= s.dyn_smem + s.dyn_smem_bytes;
}

void check_global(const void* p, size_t n, const char* what) {
  auto c = static_cast<const char*>(p);
  for (const Range& r : S().globals)
    if (c >= r.base && c + n <= r.base + r.bytes) return;
  std::fprintf(stderr, "EMU: %s at %p (%zu bytes) is outside every registered buffer\n", what, p, n);
  std::abort();
}

void register_global(const void* p, size_t bytes, const char* name) {
  S().globals.push_back({static_cast<const char*>(p), bytes, name});
}
void clear_globals() { S().globals.clear(); }

static void trampoline() {
  State& s = S();
  s.body();
  s.cur->done = true;
  if (!s.cur->open.empty() || !s.cur->groups.empty()) {
    // copies still in flight at exit: complete them (legal in CUDA, but note it)
  }
}

void launch(dim3 grid, dim3 block, size_t smem, const void* fn, std::function<void()> body) {
  State& s = S();
  const unsigned nthreads = block.x * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024) fail("block size out of range");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail("empty grid");
  if (grid.y > 65535 || grid.z > 65535) fail("grid y/z > 65535");
  if (smem > 48 * 1024) {
    auto it = s.smem_attr.find(fn);
    if (it == s.smem_attr.end() || it->second < smem) fail("dynamic smem > 48 KiB without the attribute");
  }
  static std::vector<unsigned char> smem_buf(256 * 1024 + 128);
  s.dyn_smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_buf.data()) + 127) & ~uintptr_t(127));
  s.dyn_smem_bytes = smem;
  s.body = std::move(body);
  s.grid_dim = {grid.x, grid.y, grid.z};
  s.block_dim = {block.x, block.y, block.z};
  const int nwarps = (nthreads + 31) / 32;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        s.block_idx = {bx, by, bz};
        std::memset(s.dyn_smem, 0xff, 256 * 1024);  // NaN poison
        s.fibers.assign(nthreads, Fiber{});
        s.cta_bar = Barrier{int(nthreads), 0, 0};
        s.warp_bars.assign(nwarps, Barrier{});
        for (int w = 0; w < nwarps; ++w) s.warp_bars[w].count = std::min(32, int(nthreads) - 32 * w);
        s.xbuf.assign(nwarps, {});
        s.or_acc = 0;
        for (unsigned i = 0; i < nthreads; ++i) {
          Fiber& f = s.fibers[i];
          f.linear = int(i);
          f.tid = {i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
          f.stack.resize(256 * 1024);
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = &s.sched;
          makecontext(&f.ctx, trampoline, 0);
        }
        std::vector<int> order(nthreads);
        for (unsigned i = 0; i < nthreads; ++i) order[i] = int(i);
        long idle_rounds = 0;
        for (;;) {
          bool any = false;
          const long before = s.progress;
          std::shuffle(order.begin(), order.end(), s.rng);
          int finished = 0;
          for (int i : order) {
            Fiber& f = s.fibers[i];
            if (f.done) continue;
            any = true;
            s.cur = &f;
            swapcontext(&s.sched, &f.ctx);
            if (f.done) ++finished;
          }
          if (!any) break;
          if (s.progress == before && finished == 0) {
            if (++idle_rounds > 3) fail("deadlock: threads wait on a barrier nobody else reaches");
          } else {
            idle_rounds = 0;
          }
        }
        s.fibers.clear();
      }
}

}  // namespace emu
