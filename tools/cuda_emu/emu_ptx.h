// The emulator's models of the PTX instructions in csrc/attention/cuda_primitives.cuh
// (which calls these under CM3RT_EMU). Semantics follow the PTX ISA (8.x):
//   cp.async.cg.shared.global [dst], [src], 16, src_size  (src_size 0: zero-fill);
//   cp.async.commit_group / cp.async.wait_group N;
//   ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16;
//   mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 (fp32 accumulate).
// Each is unit-tested against the ISA's fragment tables in tools/cuda_emu/tests/.
#pragma once

#include <cstdint>

namespace emu::ptx {

// The 16 bytes at gmem_src land in smem_dst by this thread's next cp_async_wait that covers
// the group; until then the destination is "in flight" (reading it is a finding).
void cp_async_16(void* smem_dst, const void* gmem_src, bool valid);
void cp_async_commit();
void cp_async_wait(int n);  // until at most n committed groups of this thread are in flight

void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row, bool trans);

enum class MmaType { kF16, kBF16 };
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, MmaType t);

}  // namespace emu::ptx
