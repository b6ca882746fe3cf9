// kv_append on CUDA: one warp per (token, kv head) row, 16-byte vector copies.
#include <cuda_runtime.h>

#include "attention/kv_append.h"
#include "common/cuda_launch.cuh"
#include "common/device.h"

namespace cm3rt {

namespace {

// Rows are D * esize bytes; D is a multiple of 8 and rows are 16-byte aligned when the
// tensors are (checked on the host), else the 4-byte path is used.
template <typename Vec>
__global__ void kv_append_kernel(KvAppendParams p, int row_vecs, int esize) {
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;  // t * Hkv + h
  if (row >= int64_t(p.T) * p.Hkv) return;
  const int t = int(row / p.Hkv), h = int(row % p.Hkv);
  const int32_t slot = p.slots[t];
  if (slot < 0 || int64_t(slot) >= int64_t(p.NB) * p.BS) return;  // padding / out of range: skip
  const int64_t dst = (int64_t(slot) * p.Hkv + h) * p.D * esize;
  const auto* k = reinterpret_cast<const char*>(p.k) + (t * p.k_stride_t + h * p.k_stride_h) * esize;
  const auto* v = reinterpret_cast<const char*>(p.v) + (t * p.v_stride_t + h * p.v_stride_h) * esize;
  auto* kc = reinterpret_cast<Vec*>(static_cast<char*>(p.k_cache) + dst);
  auto* vc = reinterpret_cast<Vec*>(static_cast<char*>(p.v_cache) + dst);
  for (int i = threadIdx.x % 32; i < row_vecs; i += 32) {
    kc[i] = reinterpret_cast<const Vec*>(k)[i];
    vc[i] = reinterpret_cast<const Vec*>(v)[i];
  }
}

bool aligned16(const void* ptr, int64_t stride_bytes_a, int64_t stride_bytes_b) {
  return (reinterpret_cast<uintptr_t>(ptr) % 16 == 0) && stride_bytes_a % 16 == 0 &&
         stride_bytes_b % 16 == 0;
}

}  // namespace

void kv_append_cuda(const KvAppendParams& p, void* stream) {
  const int esize = dtype_size(p.dtype);
  const int64_t row_bytes = int64_t(p.D) * esize;
  const int64_t rows = int64_t(p.T) * p.Hkv;
  constexpr int kWarps = 8;
  const dim3 grid(unsigned((rows + kWarps - 1) / kWarps)), block(32 * kWarps);
  auto s = static_cast<cudaStream_t>(stream);
  const bool vec16 = row_bytes % 16 == 0 &&
                     aligned16(p.k, p.k_stride_t * esize, p.k_stride_h * esize) &&
                     aligned16(p.v, p.v_stride_t * esize, p.v_stride_h * esize) &&
                     reinterpret_cast<uintptr_t>(p.k_cache) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(p.v_cache) % 16 == 0;
  if (vec16)
    cuda::launch<kv_append_kernel<int4>>(grid, block, 0, s, p, int(row_bytes / 16), esize);
  else
    cuda::launch<kv_append_kernel<uint16_t>>(grid, block, 0, s, p, int(row_bytes / 2), esize);
  check_cuda_launch("kv_append");
}

}  // namespace cm3rt
