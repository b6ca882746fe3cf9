// Deliberately broken kernels, one per detector, each with a fixed twin that differs only in
// the bug. tests/test_cuda_emulator.py runs them: the broken one must raise the detector's
// finding (kernel, thread, block, address), the fixed one must run clean, so a detector that
// always fires or never fires fails a test.
#include <cstring>
#include <string>
#include <vector>

#include "attention/cuda_primitives.cuh"
#include "tests/registry.h"

namespace emu::selftest {

namespace cuda = cm3rt::cuda;
using cm3rt::bf16_t;
using cm3rt::from_float;
using cm3rt::half_t;
using cm3rt::to_float;
namespace {

struct Args {
  const float* in;  // [n]
  float* out;       // [n]
  int n;
  int broken;       // 1: the bug, 0: the fixed twin
};

// Runs `K` on 2 blocks of 64 threads over in/out of 128 floats, registered as the tensors
// 'in' and 'out'.
template <auto K>
std::string run_pair(Args proto, size_t smem = 0, unsigned threads = 64) {
  std::vector<float> in(128), out(128, 0.0f);
  for (int i = 0; i < 128; ++i) in[i] = float(i);
  Buffer b0(in.data(), in.size() * 4, "in"), b1(out.data(), out.size() * 4, "out");
  proto.in = in.data();
  proto.out = out.data();
  proto.n = 128;
  cuda::launch<K>(dim3(2), dim3(threads), smem, nullptr, proto);
  return "ran clean";
}

// memcheck, global: the last thread reads one element past the end of `in`.
__global__ void global_read_past_end(Args a) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  a.out[i] = a.in[a.broken ? i + 1 : i];
}
EMU_SELFTEST(broken_global_read) { return run_pair<global_read_past_end>({nullptr, nullptr, 0, 1}); }
EMU_SELFTEST(fixed_global_read) { return run_pair<global_read_past_end>({nullptr, nullptr, 0, 0}); }

// memcheck, global: a write 4 elements before the start of `out` (a negative index).
__global__ void global_write_before_start(Args a) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  a.out[a.broken ? i - 4 : i] = a.in[i];
}
EMU_SELFTEST(broken_global_write) { return run_pair<global_write_before_start>({nullptr, nullptr, 0, 1}); }
EMU_SELFTEST(fixed_global_write) { return run_pair<global_write_before_start>({nullptr, nullptr, 0, 0}); }

// memcheck, global: a 16-byte vector load from an address that is only 8-byte aligned.
__global__ void misaligned_vector_load(Args a) {
  const int i = threadIdx.x;
  if (i >= 16) return;
  const char* base = reinterpret_cast<const char*>(a.in) + (a.broken ? 8 : 0);
  const int4 v = *reinterpret_cast<const int4*>(base + 16 * i);
  std::memcpy(a.out + 4 * (blockIdx.x * 16 + i), &v, 16);
}
EMU_SELFTEST(broken_misaligned) { return run_pair<misaligned_vector_load>({nullptr, nullptr, 0, 1}); }
EMU_SELFTEST(fixed_misaligned) { return run_pair<misaligned_vector_load>({nullptr, nullptr, 0, 0}); }

// memcheck, shared: dynamic shared memory of 64 floats, indexed with 65.
__global__ void dynamic_shared_overflow(Args a) {
  float* s = cuda::dynamic_smem<float>();
  const int t = threadIdx.x;
  s[t] = a.in[t];
  __syncthreads();
  a.out[blockIdx.x * 64 + t] = s[a.broken ? (t + 1) : (t + 1) % 64];
}
EMU_SELFTEST(broken_shared_bounds) { return run_pair<dynamic_shared_overflow>({nullptr, nullptr, 0, 1}, 64 * 4); }
EMU_SELFTEST(fixed_shared_bounds) { return run_pair<dynamic_shared_overflow>({nullptr, nullptr, 0, 0}, 64 * 4); }

// memcheck, static shared: a __shared__ array of 64 floats indexed with 64.
__global__ void static_shared_overflow(Args a) {
  __shared__ float s[64];
  const int t = threadIdx.x;
  s[t] = a.in[t];
  __syncthreads();
  a.out[blockIdx.x * 64 + t] = s[a.broken ? 64 - (t == 0 ? 0 : t) : 63 - t];
}
EMU_SELFTEST(broken_static_shared_bounds) { return run_pair<static_shared_overflow>({nullptr, nullptr, 0, 1}); }
EMU_SELFTEST(fixed_static_shared_bounds) { return run_pair<static_shared_overflow>({nullptr, nullptr, 0, 0}); }

// memcheck: a cp.async whose source runs past the end of `in`.
__global__ void cp_async_source_past_end(Args a) {
  float* s = cuda::dynamic_smem<float>();
  const int t = threadIdx.x;  // 32 threads copy 4 floats each: 128 floats, all of `in`
  cuda::cp_async_16(s + 4 * t, a.in + 4 * t + (a.broken ? 4 : 0), true);
  cuda::cp_async_commit();
  cuda::cp_async_wait<0>();
  __syncthreads();
  a.out[blockIdx.x * 32 + t] = s[4 * t];
}
EMU_SELFTEST(broken_cp_async_source) {
  return run_pair<cp_async_source_past_end>({nullptr, nullptr, 0, 1}, 512, 32);
}
EMU_SELFTEST(fixed_cp_async_source) {
  return run_pair<cp_async_source_past_end>({nullptr, nullptr, 0, 0}, 512, 32);
}

// racecheck, read after write: thread t reads what thread t + 32 (another warp) wrote, with
// no __syncthreads between.
__global__ void missing_syncthreads(Args a) {
  __shared__ float s[64];
  const int t = threadIdx.x;
  s[t] = a.in[t];
  if (!a.broken) __syncthreads();
  a.out[blockIdx.x * 64 + t] = s[(t + 32) % 64];
}
EMU_SELFTEST(broken_race_raw) { return run_pair<missing_syncthreads>({nullptr, nullptr, 0, 1}); }
EMU_SELFTEST(fixed_race_raw) { return run_pair<missing_syncthreads>({nullptr, nullptr, 0, 0}); }

// racecheck, write after read, within one warp: lane t reads s[t ^ 1], then lane t ^ 1
// overwrites it; the fix is a __syncwarp between (which orders a warp's accesses).
__global__ void missing_syncwarp(Args a) {
  __shared__ float s[64];
  const int t = threadIdx.x;
  s[t] = a.in[t];
  __syncthreads();
  const float v = s[t ^ 1];
  if (!a.broken) __syncwarp();
  s[t] = 2.0f * v;
  __syncthreads();
  a.out[blockIdx.x * 64 + t] = s[t];
}
EMU_SELFTEST(broken_race_war) { return run_pair<missing_syncwarp>({nullptr, nullptr, 0, 1}); }
EMU_SELFTEST(fixed_race_war) { return run_pair<missing_syncwarp>({nullptr, nullptr, 0, 0}); }

// racecheck, write after write: every thread stores its value into one slot (the fix: only
// thread 0 does).
__global__ void everyone_writes_one_slot(Args a) {
  __shared__ float slot;
  const int t = threadIdx.x;
  if (a.broken || t == 0) slot = a.in[t];
  __syncthreads();
  a.out[blockIdx.x * 64 + t] = slot;
}
EMU_SELFTEST(broken_race_waw) { return run_pair<everyone_writes_one_slot>({nullptr, nullptr, 0, 1}); }
EMU_SELFTEST(fixed_race_waw) { return run_pair<everyone_writes_one_slot>({nullptr, nullptr, 0, 0}); }

// racecheck: a thread reads a cp.async destination before the cp.async.wait_group that
// covers it: two groups in flight, wait_group 1 lands only the older one (the fix waits for
// both, wait_group 0, before reading the newer one).
__global__ void read_before_wait(Args a) {
  float* s = cuda::dynamic_smem<float>();
  const int t = threadIdx.x;  // 16 threads, two 16-byte chunks each
  cuda::cp_async_16(s + 4 * t, a.in + 4 * t, true);
  cuda::cp_async_commit();
  cuda::cp_async_16(s + 64 + 4 * t, a.in + 64 + 4 * t, true);
  cuda::cp_async_commit();
  cuda::cp_async_wait<1>();
  const float older = s[4 * t];  // landed: fine in both twins
  if (!a.broken) cuda::cp_async_wait<0>();
  const float newer = s[64 + 4 * t];
  cuda::cp_async_wait<0>();
  a.out[blockIdx.x * 16 + t] = older + newer;
}
EMU_SELFTEST(broken_cp_async_wait) { return run_pair<read_before_wait>({nullptr, nullptr, 0, 1}, 512, 16); }
EMU_SELFTEST(fixed_cp_async_wait) { return run_pair<read_before_wait>({nullptr, nullptr, 0, 0}, 512, 16); }

// racecheck, global: every block writes all of `out` (the fix: each block its own half).
__global__ void blocks_write_the_same_output(Args a) {
  const int t = threadIdx.x;
  a.out[(a.broken ? 0 : blockIdx.x * 64) + t] = a.in[t];
}
EMU_SELFTEST(broken_global_race) { return run_pair<blocks_write_the_same_output>({nullptr, nullptr, 0, 1}); }
EMU_SELFTEST(fixed_global_race) { return run_pair<blocks_write_the_same_output>({nullptr, nullptr, 0, 0}); }

// initcheck: the block reads a shared element nobody wrote (thread 63's element is written
// only in the fixed twin).
__global__ void uninitialised_shared(Args a) {
  __shared__ float s[64];
  const int t = threadIdx.x;
  if (!a.broken || t != 63) s[t] = a.in[t];
  __syncthreads();
  a.out[blockIdx.x * 64 + t] = s[63 - t];
}
EMU_SELFTEST(broken_uninit) { return run_pair<uninitialised_shared>({nullptr, nullptr, 0, 1}); }
EMU_SELFTEST(fixed_uninit) { return run_pair<uninitialised_shared>({nullptr, nullptr, 0, 0}); }

// synccheck: the two warps wait at different __syncthreads (divergent barrier).
__global__ void divergent_barrier(Args a) {
  __shared__ float s[64];
  const int t = threadIdx.x;
  s[t] = a.in[t];
  if (a.broken && t < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  a.out[blockIdx.x * 64 + t] = s[63 - t];
}
EMU_SELFTEST(broken_divergent_barrier) { return run_pair<divergent_barrier>({nullptr, nullptr, 0, 1}); }
EMU_SELFTEST(fixed_divergent_barrier) { return run_pair<divergent_barrier>({nullptr, nullptr, 0, 0}); }

// synccheck: thread 5 returns before a __syncthreads the others wait at.
__global__ void barrier_after_early_exit(Args a) {
  __shared__ float s[64];
  const int t = threadIdx.x;
  s[t] = a.in[t];
  if (a.broken && t == 5) return;
  __syncthreads();
  a.out[blockIdx.x * 64 + t] = s[63 - t];
}
EMU_SELFTEST(broken_barrier_exit) { return run_pair<barrier_after_early_exit>({nullptr, nullptr, 0, 1}); }
EMU_SELFTEST(fixed_barrier_exit) { return run_pair<barrier_after_early_exit>({nullptr, nullptr, 0, 0}); }

// synccheck: a full-mask shuffle after lane 3 of the warp has exited.
__global__ void shuffle_after_exit(Args a) {
  const int t = threadIdx.x;
  if (a.broken && t == 3) return;
  const float v = __shfl_xor_sync(0xffffffffu, a.in[t], 1);
  a.out[blockIdx.x * 64 + t] = v;
}
EMU_SELFTEST(broken_shuffle_exit) { return run_pair<shuffle_after_exit>({nullptr, nullptr, 0, 1}); }
EMU_SELFTEST(fixed_shuffle_exit) { return run_pair<shuffle_after_exit>({nullptr, nullptr, 0, 0}); }

}  // namespace
}  // namespace emu::selftest
