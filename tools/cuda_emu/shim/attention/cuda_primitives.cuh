// Emulated cuda_primitives.cuh: same interface as csrc/attention/cuda_primitives.cuh, with
// the PTX semantics (mma.m16n8k16 fragments, ldmatrix, cp.async groups) done in C++.
#pragma once
#include <cstdint>
#include <cstring>
#include <utility>

#include "common/dtype.h"
#include "common/macros.h"
#include "emu.h"

namespace cm3rt::cuda {

inline void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  if (!emu::in_smem(smem_dst, 16)) emu::fail("cp.async destination outside dynamic smem");
  if (reinterpret_cast<uintptr_t>(smem_dst) % 16) emu::fail("cp.async dst misaligned");
  if (valid) {
    if (reinterpret_cast<uintptr_t>(gmem_src) % 16) emu::fail("cp.async src misaligned");
    emu::check_global(gmem_src, 16, "cp.async source");
  }
  emu::CpCopy c{smem_dst, gmem_src, valid};
  // Randomly land now or at the wait: catches both reading too early and overwriting a
  // stage that other warps may still read.
  if (emu::S().rng() % 2) {
    if (valid) std::memcpy(smem_dst, gmem_src, 16); else std::memset(smem_dst, 0, 16);
    c.dst = nullptr;
  }
  emu::me().open.push_back(c);
}
inline void cp_async_commit() {
  emu::me().groups.push_back(std::move(emu::me().open));
  emu::me().open.clear();
}
template <int N>
inline void cp_async_wait() {
  auto& g = emu::me().groups;
  while (int(g.size()) > N) {
    for (const auto& c : g.front())
      if (c.dst) {
        if (c.valid) std::memcpy(c.dst, c.src, 16); else std::memset(c.dst, 0, 16);
      }
    g.erase(g.begin());
  }
}

inline uint16_t smem_u16(const void* row, int col) {
  uint16_t v;
  std::memcpy(&v, static_cast<const char*>(row) + 2 * col, 2);
  return v;
}

template <bool kTrans>
inline void ldmatrix_impl(uint32_t (&r)[4], const void* smem_row) {
  if (!emu::in_smem(smem_row, 16)) emu::fail("ldmatrix row outside dynamic smem");
  if (reinterpret_cast<uintptr_t>(smem_row) % 16) emu::fail("ldmatrix row misaligned");
  const int lane = emu::lane(), g = lane / 4, t = lane % 4;
  emu::warp_exchange([&](auto& slot) { slot[0] = reinterpret_cast<uint64_t>(smem_row); },
                     [&](auto& all) {
                       for (int i = 0; i < 4; ++i) {
                         uint32_t lo, hi;
                         if (!kTrans) {
                           const void* row = reinterpret_cast<const void*>(all[8 * i + g][0]);
                           lo = smem_u16(row, 2 * t);
                           hi = smem_u16(row, 2 * t + 1);
                         } else {
                           lo = smem_u16(reinterpret_cast<const void*>(all[8 * i + 2 * t][0]), g);
                           hi = smem_u16(reinterpret_cast<const void*>(all[8 * i + 2 * t + 1][0]), g);
                         }
                         r[i] = lo | (hi << 16);
                       }
                     });
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) { ldmatrix_impl<false>(r, smem_row); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) { ldmatrix_impl<true>(r, smem_row); }

template <typename T>
inline float elem(uint32_t reg, int half) {
  T x;
  x.bits = uint16_t(half ? reg >> 16 : reg & 0xffff);
  return to_float(x);
}

template <typename T>
struct Mma {
  // D = A * B + C per the m16n8k16 fragment layouts.
  static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    const int lane = emu::lane(), g = lane / 4, t = lane % 4;
    float out[4];
    emu::warp_exchange(
        [&](auto& slot) {
          slot[0] = a[0] | (uint64_t(a[1]) << 32);
          slot[1] = a[2] | (uint64_t(a[3]) << 32);
          slot[2] = b0 | (uint64_t(b1) << 32);
          uint32_t c[4];
          std::memcpy(c, d, 16);
          slot[3] = c[0] | (uint64_t(c[1]) << 32);
          slot[4] = c[2] | (uint64_t(c[3]) << 32);
        },
        [&](auto& all) {
          auto A = [&](int r, int c) {  // element (r, c) of the 16x16 A
            const int ln = (r % 8) * 4 + (c % 8) / 2, reg = (r / 8) + 2 * (c / 8);
            const uint64_t w = all[ln][reg / 2];
            return elem<T>(uint32_t(reg % 2 ? w >> 32 : w), c % 2);
          };
          auto B = [&](int k, int n) {  // element (k, n) of the 16x8 B
            const int ln = n * 4 + (k % 8) / 2, reg = k / 8;
            const uint64_t w = all[ln][2];
            return elem<T>(uint32_t(reg ? w >> 32 : w), k % 2);
          };
          auto C = [&](int r, int c) {
            const int ln = (r % 8) * 4 + c / 2, idx = (r / 8) * 2 + c % 2;
            const uint64_t w = all[ln][3 + idx / 2];
            const uint32_t u = uint32_t(idx % 2 ? w >> 32 : w);
            float f;
            std::memcpy(&f, &u, 4);
            return f;
          };
          for (int i = 0; i < 4; ++i) {
            const int r = g + 8 * (i / 2), c = 2 * t + i % 2;
            float acc = C(r, c);
            for (int k = 0; k < 16; ++k) acc += A(r, k) * B(k, c);
            out[i] = acc;
          }
        });
    for (int i = 0; i < 4; ++i) d[i] = out[i];
  }
  static uint32_t pack(float lo, float hi) {
    return uint32_t(from_float<T>(lo).bits) | (uint32_t(from_float<T>(hi).bits) << 16);
  }
};

inline float shfl_xor(float v, int lane_mask) {
  float r;
  const int lane = emu::lane();
  emu::warp_exchange([&](auto& slot) { std::memcpy(&slot[0], &v, 4); },
                     [&](auto& all) { std::memcpy(&r, &all[lane ^ lane_mask][0], 4); });
  return r;
}

inline uint4 ldg16(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16) emu::fail("ldg16 misaligned");
  emu::check_global(p, 16, "ldg16");
  uint4 v;
  std::memcpy(&v, p, 16);
  return v;
}

template <typename T>
inline T* dynamic_smem() { return reinterpret_cast<T*>(emu::S().dyn_smem); }

template <typename Kernel>
bool set_max_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return true;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)) == cudaSuccess;
}

template <typename... KArgs, typename... Args>
void launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t,
                   Args&&... args) {
  auto tup = std::make_tuple(std::decay_t<Args>(args)...);
  emu::launch(grid, block, smem, reinterpret_cast<const void*>(kernel),
              [&] { std::apply([&](auto&... a) { kernel(a...); }, tup); });
}

}  // namespace cm3rt::cuda
