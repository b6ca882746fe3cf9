// VQ codebook kernels: nearest code (fused distance + argmin) and code embedding (gather).
//
// vq_nearest: idx[i] = argmin_j ||z_i - e_j||^2 = argmin_j (||e_j||^2 - 2 z_i . e_j), ties to
// the lowest j, computed tile by tile like a GEMM with a running argmin: no [N, K] distance
// matrix exists at any time. Only finite scores compete; a row with none (NaN / inf in z)
// gets -1.
// vq_embed: out[n, :] = codebook[idx[n], :]; an index outside [0, K) (rejected by the bindings
// before a CPU call, and before a CUDA call with validate=True) yields a zero row, never an
// out-of-bounds read.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace cm3rt {

struct VqNearestParams {
  const void* z;          // [N, C], last dim contiguous
  int64_t z_stride;       // elements between rows of z
  const void* codebook;   // [K, C], last dim contiguous
  int64_t cb_stride;      // elements between codes
  const float* sqnorm;    // [K] ||e_j||^2, or nullptr (computed by the kernel)
  DType dtype;            // of z and codebook
  int N, K, C;
  int64_t* out;           // [N]
};

struct VqEmbedParams {
  const void* idx;        // [n] int32 or int64, contiguous
  bool idx_int64;
  int64_t n;
  const void* codebook;   // [K, C], last dim contiguous
  int64_t cb_stride;
  int K, C;
  DType dtype;            // of codebook and out
  void* out;              // [n, C] contiguous
};

void vq_nearest_cpu(const VqNearestParams& p);
void vq_nearest_cuda(const VqNearestParams& p, void* stream);
void vq_embed_cpu(const VqEmbedParams& p);
void vq_embed_cuda(const VqEmbedParams& p, void* stream);

}  // namespace cm3rt
