// vq_nearest and vq_embed on CUDA (contract: vq.h).
//
// vq_nearest: a tiled SIMT GEMM (64 rows x 64 codes per tile, 32 channels per shared-memory
// stage, 4 x 4 outputs per thread, fp32 accumulation) with the argmin fused into its epilogue:
// each thread keeps a running best per row over the codes it visits (in increasing order), the
// 16 threads of a row merge with warp shuffles, and blocks that split the codebook merge with
// a 64-bit atomicMin on (score key, code) packed into the output itself (vq_math.h), which a
// last tiny kernel turns into indices. No [N, K] buffer and no workspace.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>

#include "common/cuda_launch.cuh"
#include "common/device.h"
#include "vq/vq.h"
#include "vq/vq_math.h"

namespace cm3rt {

namespace {

constexpr int kBM = 64, kBN = 64, kBC = 32, kTM = 4, kTN = 4;
constexpr int kVqThreads = (kBM / kTM) * (kBN / kTN);  // 256

__global__ void vq_fill_kernel(uint64_t* packed, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) packed[i] = kVqNone;
}

__global__ void vq_unpack_kernel(uint64_t* packed, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) reinterpret_cast<int64_t*>(packed)[i] = vq_unpack_index(packed[i]);
}

template <typename T, bool kOwnNorm>
__global__ void __launch_bounds__(kVqThreads)
    vq_nearest_kernel(VqNearestParams p, uint64_t* packed, int codes_per_split) {
  __shared__ float zs[kBC][kBM + 4];  // transposed tiles: [channel][row], [channel][code]
  __shared__ float es[kBC][kBN + 4];
  const int tid = threadIdx.x, tx = tid % (kBN / kTN), ty = tid / (kBN / kTN);
  const int row0 = blockIdx.x * kBM;
  const int k_begin = blockIdx.y * codes_per_split;
  const int k_end = min(p.K, k_begin + codes_per_split);
  const T* z = static_cast<const T*>(p.z);
  const T* cb = static_cast<const T*>(p.codebook);

  float best[kTM];
  int best_code[kTM];
#pragma unroll
  for (int i = 0; i < kTM; ++i) { best[i] = INFINITY; best_code[i] = -1; }

  for (int kt = k_begin; kt < k_end; kt += kBN) {
    float acc[kTM][kTN], nrm[kTN];
#pragma unroll
    for (int j = 0; j < kTN; ++j) {
      nrm[j] = 0.0f;
#pragma unroll
      for (int i = 0; i < kTM; ++i) acc[i][j] = 0.0f;
    }
    for (int c0 = 0; c0 < p.C; c0 += kBC) {
      // Coalesced along C: consecutive threads read consecutive channels of a row.
#pragma unroll
      for (int q = 0; q < kBM * kBC / kVqThreads; ++q) {
        const int idx = tid + q * kVqThreads, r = idx / kBC, c = idx % kBC;
        const int gr = row0 + r, gc = c0 + c;
        zs[c][r] = (gr < p.N && gc < p.C) ? to_float(z[int64_t(gr) * p.z_stride + gc]) : 0.0f;
      }
#pragma unroll
      for (int q = 0; q < kBN * kBC / kVqThreads; ++q) {
        const int idx = tid + q * kVqThreads, r = idx / kBC, c = idx % kBC;
        const int gk = kt + r, gc = c0 + c;
        es[c][r] = (gk < k_end && gc < p.C) ? to_float(cb[int64_t(gk) * p.cb_stride + gc]) : 0.0f;
      }
      __syncthreads();
#pragma unroll 8
      for (int c = 0; c < kBC; ++c) {
        float a[kTM], b[kTN];
#pragma unroll
        for (int i = 0; i < kTM; ++i) a[i] = zs[c][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < kTN; ++j) {
          b[j] = es[c][tx + 16 * j];
          if (kOwnNorm) nrm[j] = fmaf(b[j], b[j], nrm[j]);
        }
#pragma unroll
        for (int i = 0; i < kTM; ++i)
#pragma unroll
          for (int j = 0; j < kTN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
    // Epilogue: this thread's codes kt + tx + 16 j, visited in increasing order.
#pragma unroll
    for (int j = 0; j < kTN; ++j) {
      const int code = kt + tx + 16 * j;
      if (code >= k_end) continue;
      const float sq = kOwnNorm ? nrm[j] : p.sqnorm[code];
#pragma unroll
      for (int i = 0; i < kTM; ++i) {
        const float s = vq_score(sq, acc[i][j]);
        if (vq_better(s, best[i])) { best[i] = s; best_code[i] = code; }
      }
    }
  }
  // Merge the 16 threads of each row (consecutive lanes), then across blocks.
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    uint64_t v = best_code[i] >= 0 ? vq_pack(best[i], best_code[i]) : kVqNone;
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) {
      const uint64_t w = __shfl_xor_sync(0xffffffffu, v, o);
      v = w < v ? w : v;
    }
    const int row = row0 + ty + 16 * i;
    if (tx == 0 && row < p.N && v != kVqNone)
      atomicMin(reinterpret_cast<unsigned long long*>(packed + row),
                static_cast<unsigned long long>(v));
  }
}

template <typename Vec>
__global__ void vq_embed_kernel(VqEmbedParams p, int row_vecs, int esize) {
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= p.n) return;
  const int64_t j = p.idx_int64 ? static_cast<const int64_t*>(p.idx)[row]
                                : static_cast<const int32_t*>(p.idx)[row];
  Vec* dst = reinterpret_cast<Vec*>(static_cast<char*>(p.out) + row * int64_t(row_vecs) *
                                    int64_t(sizeof(Vec)));
  const bool ok = j >= 0 && j < p.K;
  const Vec* src = ok ? reinterpret_cast<const Vec*>(static_cast<const char*>(p.codebook) +
                                                     j * p.cb_stride * esize)
                      : nullptr;
  for (int i = threadIdx.x % 32; i < row_vecs; i += 32) dst[i] = ok ? src[i] : Vec{};
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T>
void launch_nearest(const VqNearestParams& p, cudaStream_t s) {
  int dev = 0;
  cudaGetDevice(&dev);
  const int sm = std::max(1, cuda_sm_count(dev));
  const int blocks_x = (p.N + kBM - 1) / kBM;
  const int tiles_k = (p.K + kBN - 1) / kBN;
  // Split the codebook so that about two blocks per SM run (merged by atomicMin).
  const int splits = std::clamp((2 * sm + blocks_x - 1) / blocks_x, 1, tiles_k);
  const int codes_per_split = ((tiles_k + splits - 1) / splits) * kBN;
  const int grid_y = (p.K + codes_per_split - 1) / codes_per_split;
  auto* packed = reinterpret_cast<uint64_t*>(p.out);
  cuda::launch<vq_fill_kernel>(dim3((p.N + 255) / 256), dim3(256), 0, s, packed, p.N);
  const dim3 grid{unsigned(blocks_x), unsigned(grid_y), 1u};
  if (p.sqnorm)
    cuda::launch<vq_nearest_kernel<T, false>>(grid, dim3(kVqThreads), 0, s, p, packed, codes_per_split);
  else
    cuda::launch<vq_nearest_kernel<T, true>>(grid, dim3(kVqThreads), 0, s, p, packed, codes_per_split);
  cuda::launch<vq_unpack_kernel>(dim3((p.N + 255) / 256), dim3(256), 0, s, packed, p.N);
}

}  // namespace

void vq_nearest_cuda(const VqNearestParams& p, void* stream) {
  if (p.N == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::kFloat32: launch_nearest<float>(p, s); break;
    case DType::kFloat16: launch_nearest<half_t>(p, s); break;
    case DType::kBFloat16: launch_nearest<bf16_t>(p, s); break;
    default: throw std::invalid_argument("vq_nearest: z must be float32/float16/bfloat16");
  }
  check_cuda_launch("vq_nearest");
}

void vq_embed_cuda(const VqEmbedParams& p, void* stream) {
  if (p.n == 0) return;
  const int esize = dtype_size(p.dtype);
  const int64_t row_bytes = int64_t(p.C) * esize;
  constexpr int kWarps = 8;
  const dim3 grid(unsigned((p.n + kWarps - 1) / kWarps)), block(32 * kWarps);
  auto s = static_cast<cudaStream_t>(stream);
  const bool vec16 = row_bytes % 16 == 0 && aligned16(p.codebook) && aligned16(p.out) &&
                     (p.cb_stride * esize) % 16 == 0;
  if (vec16)
    cuda::launch<vq_embed_kernel<int4>>(grid, block, 0, s, p, int(row_bytes / 16), esize);
  else
    cuda::launch<vq_embed_kernel<uint16_t>>(grid, block, 0, s, p, int(row_bytes / 2), esize);
  check_cuda_launch("vq_embed");
}

}  // namespace cm3rt
