// The few CUDA primitives the attention kernels use beyond plain C++: async copies
// (cp.async, sm80+), ldmatrix, mma.sync m16n8k16, warp shuffles, vector loads, dynamic shared
// memory and the kernel launch. Kept in one small header so the kernels read as index
// arithmetic plus these calls.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), g = lane / 4, t = lane % 4:
//   A 16x16 (row-major), 4 regs of 2 elements: a0 (row g,   cols 2t, 2t+1), a1 (row g+8, ..),
//                                              a2 (row g,   cols 2t+8, 2t+9), a3 (row g+8, ..)
//   B 16x8 (k x n, "col"), 2 regs:  b0 (k 2t, 2t+1; n g), b1 (k 2t+8, 2t+9; n g)
//   C/D 16x8 fp32, 4 regs:          c0, c1 (row g, cols 2t, 2t+1), c2, c3 (row g+8, ..)
// ldmatrix .x4: lanes 8i..8i+7 give the 8 row addresses (16 bytes each) of matrix i; lane
// receives, in register i, elements (row g, cols 2t, 2t+1) of matrix i, or of its transpose
// with .trans. The lower 16 bits of a register hold the lower column.
//
// Each primitive is one PTX instruction under nvcc; in the emulator build (CM3RT_EMU,
// tools/cuda_emu/) the same function calls the emulator's model of that instruction
// (tools/cuda_emu/emu_ptx.h, unit-tested against the PTX ISA), so the kernels compile against
// this very header in both builds and the two cannot drift apart.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "common/cuda_launch.cuh"
#include "common/dtype.h"
#include "common/macros.h"

#if defined(CM3RT_EMU)
#include "emu_ptx.h"
#endif

namespace cm3rt::cuda {

#if !defined(CM3RT_EMU)
CM3RT_DEVICE uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// 16-byte global -> shared copy without a register round trip; when !valid the 16 bytes are
// zero-filled and src is not read (it must still be a valid address expression).
CM3RT_DEVICE void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
#if defined(CM3RT_EMU)
  emu::ptx::cp_async_16(smem_dst, gmem_src, valid);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem_dst)),
               "l"(gmem_src), "r"(valid ? 16 : 0)
               : "memory");
#endif
}
CM3RT_DEVICE void cp_async_commit() {
#if defined(CM3RT_EMU)
  emu::ptx::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
CM3RT_DEVICE void cp_async_wait() {
#if defined(CM3RT_EMU)
  emu::ptx::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

CM3RT_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
#if defined(CM3RT_EMU)
  emu::ptx::ldmatrix_x4(r, smem_row, false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem_row)));
#endif
}
CM3RT_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
#if defined(CM3RT_EMU)
  emu::ptx::ldmatrix_x4(r, smem_row, true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem_row)));
#endif
}

// d += a * b on tensor cores, fp32 accumulation; T is the 16-bit storage type.
template <typename T> struct Mma;

template <> struct Mma<half_t> {
  static CM3RT_DEVICE void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(CM3RT_EMU)
    emu::ptx::mma_m16n8k16(d, a, b0, b1, emu::ptx::MmaType::kF16);
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
  // Two floats rounded to nearest even, `lo` in the lower 16 bits.
  static CM3RT_DEVICE uint32_t pack(float lo, float hi) {
#if defined(CM3RT_EMU)
    return from_float<half_t>(lo).bits | (uint32_t(from_float<half_t>(hi).bits) << 16);
#else
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
#endif
  }
};

template <> struct Mma<bf16_t> {
  static CM3RT_DEVICE void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(CM3RT_EMU)
    emu::ptx::mma_m16n8k16(d, a, b0, b1, emu::ptx::MmaType::kBF16);
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
  static CM3RT_DEVICE uint32_t pack(float lo, float hi) {
#if defined(CM3RT_EMU)
    return from_float<bf16_t>(lo).bits | (uint32_t(from_float<bf16_t>(hi).bits) << 16);
#else
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
#endif
  }
};

CM3RT_DEVICE float shfl_xor(float v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}

// 16-byte read-only load (the address must be 16-byte aligned).
CM3RT_DEVICE uint4 ldg16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// The kernel's dynamic shared memory (launch argument), 16-byte aligned.
template <typename T>
CM3RT_DEVICE T* dynamic_smem() {
#if defined(CM3RT_EMU)
  return static_cast<T*>(emu::dynamic_smem());
#else
  extern __shared__ __align__(16) unsigned char cm3rt_dynamic_smem[];
  return reinterpret_cast<T*>(cm3rt_dynamic_smem);
#endif
}

}  // namespace cm3rt::cuda
