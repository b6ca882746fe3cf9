// cm3rt's CUDA emulator: the CUDA device API that csrc/'s kernels use, for g++.
//
// The kernels' .cu files are compiled as C++ with -DCM3RT_EMU, this header force-included and
// tools/cuda_emu/shim first on the include path (so <cuda_runtime.h> etc. land here). A
// kernel launch (csrc/common/cuda_launch.cuh) runs the grid block by block; each CUDA thread
// of a block is a fiber (its own stack, cooperative switching), so the kernel code runs
// unchanged: a barrier or a warp collective is a point where a fiber waits for the others.
//
// The emulator is also a checker (runtime.cpp, checker.cpp). The kernel translation units
// are compiled with -fsanitize=thread, which makes g++ call __tsan_readN / __tsan_writeN
// before every memory access the kernel code makes; the emulator defines those functions
// itself (no TSan runtime is linked) and checks each access of an emulated thread:
//   memcheck:  global accesses against the buffers registered for the launch (the tensors
//              of the call), shared accesses against the block's dynamic + static size;
//   racecheck: shared-memory accesses of two threads with no barrier between them;
//   initcheck: shared memory read before this block wrote it;
//   synccheck: divergent __syncthreads / warp collectives, barriers some thread never reaches.
// Findings raise emu::Error (a std::runtime_error) naming kernel, block, thread and address.
// Everything stateful lives out of line in the runtime (compiled without instrumentation),
// so that only the kernels' own accesses are seen.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

// ---- CUDA keywords ----------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// A __shared__ variable is a function-local static: one instance, used by the block that
// runs (blocks run one after another). The checker recognises static shared memory as the
// module's writable data that kernel code touches (kernels have no other globals).
#define __shared__ static
#define __restrict__ __restrict

// ---- vector types and launch geometry -----------------------------------------------------
struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) int4 { int x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline int4 make_int4(int a, int b, int c, int d) { return {a, b, c, d}; }

using std::max;
using std::min;

namespace emu {

// An error found by the emulator: an invalid launch or a checker finding.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

uint3 thread_idx();
uint3 block_idx();
uint3 block_dim();
uint3 grid_dim();

// Barriers; file/line identify the call site (divergence check).
void syncthreads(const char* file, int line);
int syncthreads_or(int pred, const char* file, int line);
void syncwarp(unsigned mask, const char* file, int line);

enum class Shfl { kIdx, kUp, kDown, kXor };
uint64_t shfl(uint64_t v, Shfl kind, int arg, unsigned mask, int width, const char* file,
              int line);
unsigned ballot(unsigned mask, int pred, const char* file, int line);

// Atomics (checked as atomic accesses: they never race with each other).
int atomic_min_i32(int* p, int v);
unsigned long long atomic_min_u64(unsigned long long* p, unsigned long long v);
unsigned long long atomic_add_u64(unsigned long long* p, unsigned long long v);
int atomic_add_i32(int* p, int v);
float atomic_add_f32(float* p, float v);

void* dynamic_smem();

// Launch (see csrc/common/cuda_launch.cuh): runs `invoke(params)` as every thread of `grid`.
void launch(const char* kernel, const void* kernel_fn, dim3 grid, dim3 block, size_t smem, void* params,
            size_t params_bytes, void (*invoke)(void*));
// "Kernel = name" out of the __PRETTY_FUNCTION__ of cuda::launch<Kernel>.
const char* kernel_name_of(const char* pretty);

// Global memory the kernels may touch: [base, base + bytes), for messages named `name`.
// Registered by the bindings (one per tensor argument) and by the C++ tests; a kernel access
// outside every registered buffer is a memcheck finding.
// Buffers may overlap (views of one tensor); register_buffer returns an id for unregistering.
int register_buffer(const void* base, size_t bytes, const std::string& name);
void unregister_buffer(int id);
// RAII registration for tests.
struct Buffer {
  int id;
  Buffer(const void* p, size_t n, const std::string& name) : id(register_buffer(p, n, name)) {}
  ~Buffer() { unregister_buffer(id); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

// Device properties the emulated device reports.
struct DeviceProps {
  int sm_count = 132;                // H100 / H200 SXM
  int max_smem_optin = 227 * 1024;   // sm_90
};
DeviceProps& device_props();
// Counters of the last launches (for tests and timing).
struct Stats {
  long launches = 0, blocks = 0, threads = 0, switches = 0, checked_accesses = 0;
};
Stats& stats();
// Every kernel (instantiation) launched since the module was loaded, by name.
std::vector<std::string> launched_kernels();

}  // namespace emu

// ---- builtins -----------------------------------------------------------------------------
#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())
#define warpSize 32

#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define __syncthreads_or(pred) ::emu::syncthreads_or((pred), __FILE__, __LINE__)
#define __syncwarp(...) ::emu::syncwarp(::emu::detail::mask_or_full(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_sync(mask, v, lane, ...) \
  ::emu::detail::shfl_t((v), ::emu::Shfl::kIdx, (lane), (mask), ::emu::detail::width_or_32(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_up_sync(mask, v, delta, ...) \
  ::emu::detail::shfl_t((v), ::emu::Shfl::kUp, (delta), (mask), ::emu::detail::width_or_32(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, delta, ...) \
  ::emu::detail::shfl_t((v), ::emu::Shfl::kDown, (delta), (mask), ::emu::detail::width_or_32(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, lane_mask, ...) \
  ::emu::detail::shfl_t((v), ::emu::Shfl::kXor, (lane_mask), (mask), ::emu::detail::width_or_32(__VA_ARGS__), __FILE__, __LINE__)
#define __ballot_sync(mask, pred) ::emu::ballot((mask), (pred), __FILE__, __LINE__)

namespace emu::detail {
inline unsigned mask_or_full() { return 0xffffffffu; }
inline unsigned mask_or_full(unsigned m) { return m; }
inline int width_or_32() { return 32; }
inline int width_or_32(int w) { return w; }
// Shuffles move the value's bits (up to 64) through the emulator.
template <typename T>
inline T shfl_t(T v, Shfl kind, int arg, unsigned mask, int width, const char* file, int line) {
  static_assert(sizeof(T) <= 8, "shuffle of more than 64 bits");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = shfl(bits, kind, arg, mask, width, file, line);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
}  // namespace emu::detail

inline int atomicMin(int* p, int v) { return emu::atomic_min_i32(p, v); }
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  return emu::atomic_min_u64(p, v);
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return emu::atomic_add_u64(p, v);
}
inline int atomicAdd(int* p, int v) { return emu::atomic_add_i32(p, v); }
inline float atomicAdd(float* p, float v) { return emu::atomic_add_f32(p, v); }

// A read-only-cache load is a plain load (checked like any other).
template <typename T>
inline T __ldg(const T* p) { return *p; }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
