// A small CPU emulator of a CUDA thread block: one fiber (ucontext) per thread, barriers by
// cooperative yielding, warp-level primitives by exchange through a per-warp buffer.
#pragma once
#include <ucontext.h>
#include <algorithm>
#include <array>
#include <cmath>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint3_t_ { unsigned x, y, z; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
using std::min;
using std::max;

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "EMU FAILURE: %s\n", what);
  std::abort();
}

struct Barrier { int count = 0, arrived = 0; long gen = 0; };
struct CpCopy { void* dst; const void* src; bool valid; };

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  uint3_t_ tid;
  int linear = 0;
  bool done = false;
  std::vector<CpCopy> open;
  std::vector<std::vector<CpCopy>> groups;
};

struct Range { const char* base; size_t bytes; const char* name; };

struct State {
  std::vector<Fiber> fibers;
  Fiber* cur = nullptr;
  ucontext_t sched;
  Barrier cta_bar;
  std::vector<Barrier> warp_bars;
  std::vector<std::array<std::array<uint64_t, 8>, 32>> xbuf;
  int or_acc = 0;
  uint3_t_ block_idx, grid_dim, block_dim;
  unsigned char* dyn_smem = nullptr;
  size_t dyn_smem_bytes = 0;
  std::vector<Range> globals;
  std::map<const void*, size_t> smem_attr;
  long progress = 0;
  std::mt19937 rng{1234};
  int sm_count = 132;
  int max_smem_optin = 227 * 1024;
  long warp_ops = 0;
  std::function<void()> body;
};
State& S();

void yield();
void barrier_wait(Barrier& b);
inline Fiber& me() { return *S().cur; }
inline int linear_tid() { return me().linear; }
inline int lane() { return linear_tid() % 32; }
inline int warp() { return linear_tid() / 32; }

// Writes this lane's slot, waits for the warp, lets `read` look at all slots, waits again.
template <typename W, typename R>
void warp_exchange(W write, R read) {
  State& s = S();
  const int w = warp();
  ++s.warp_ops;
  write(s.xbuf[w][lane()]);
  barrier_wait(s.warp_bars[w]);
  read(s.xbuf[w]);
  barrier_wait(s.warp_bars[w]);
}

bool in_smem(const void* p, size_t n);
void check_global(const void* p, size_t n, const char* what);
void register_global(const void* p, size_t bytes, const char* name);
void clear_globals();

// Runs the grid: one CTA after another, each as blockDim fibers.
void launch(dim3 grid, dim3 block, size_t smem, const void* fn, std::function<void()> body);

}  // namespace emu

#define threadIdx (emu::S().cur->tid)
#define blockIdx (emu::S().block_idx)
#define blockDim (emu::S().block_dim)
#define gridDim (emu::S().grid_dim)

inline void __syncthreads() { emu::barrier_wait(emu::S().cta_bar); }
inline int __syncthreads_or(int pred) {
  auto& s = emu::S();
  if (pred) s.or_acc = 1;
  emu::barrier_wait(s.cta_bar);
  const int r = s.or_acc;
  emu::barrier_wait(s.cta_bar);
  if (emu::linear_tid() == 0) s.or_acc = 0;
  emu::barrier_wait(s.cta_bar);
  return r;
}
inline void __syncwarp() { emu::barrier_wait(emu::S().warp_bars[emu::warp()]); }
inline int atomicMin(int* addr, int v) {
  if (!emu::in_smem(addr, 4) && true) { /* static __shared__ lives outside dyn smem: fine */ }
  const int old = *addr;
  *addr = std::min(old, v);
  return old;
}

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emu error"; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? emu::S().sm_count : emu::S().max_smem_optin;
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F f, cudaFuncAttribute, int bytes) {
  if (bytes > emu::S().max_smem_optin) return cudaErrorInvalidValue;
  emu::S().smem_attr[reinterpret_cast<const void*>(f)] = size_t(bytes);
  return cudaSuccess;
}
