// CUDA twin of linear_cpu (see linear.h): one warp per output channel and tile of kRows rows
// of x. Each lane accumulates a strided slice of K in fp32 for every row of its tile, then a
// shuffle reduction gives the dot products; lane 0 scales and stores. The weight row is read
// once per row tile (from L2 after the first), coalesced across the warp.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common/cuda_launch.cuh"
#include "common/dtype.h"
#include "linear/linear.h"

namespace cm3rt {

namespace {

constexpr int kRows = 8;            // rows of x per warp
constexpr int kWarpsPerBlock = 4;   // output channels per block

CM3RT_DEVICE float to_f32(float v) { return v; }
CM3RT_DEVICE float to_f32(bf16_t v) { return to_float(v); }
CM3RT_DEVICE float to_f32(int8_t v) { return float(v); }
CM3RT_DEVICE void store(float* p, float v) { *p = v; }
CM3RT_DEVICE void store(bf16_t* p, float v) { *p = from_float<bf16_t>(v); }

template <typename TX, typename TW>
__global__ void linear_kernel(LinearParams p) {
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  const int m0 = blockIdx.y * kRows;
  if (n >= p.N) return;
  const TX* x = static_cast<const TX*>(p.x);
  const TW* w = static_cast<const TW*>(p.w) + int64_t(n) * p.w_stride;
  const int rows = min(kRows, p.M - m0);
  float acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = 0.0f;
  for (int k = lane; k < p.K; k += 32) {
    const float wv = to_f32(w[k]);
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      if (r < rows) acc[r] += to_f32(x[int64_t(m0 + r) * p.x_stride + k]) * wv;
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r)
    for (int off = 16; off > 0; off >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], off);
  if (lane == 0) {
    const float s = p.scales ? p.scales[n] : 1.0f;
    TX* out = static_cast<TX*>(p.out);
    for (int r = 0; r < rows; ++r) store(out + int64_t(m0 + r) * p.out_stride + n, acc[r] * s);
  }
}

template <typename TX, typename TW>
void launch(const LinearParams& p, cudaStream_t stream) {
  const dim3 grid((p.N + kWarpsPerBlock - 1) / kWarpsPerBlock, (p.M + kRows - 1) / kRows);
  cuda::launch<linear_kernel<TX, TW>>(grid, dim3(kWarpsPerBlock * 32), 0, stream, p);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("linear: CUDA launch failed: ") +
                             cudaGetErrorString(err));
}

template <typename TX>
void dispatch_weights(const LinearParams& p, cudaStream_t stream) {
  switch (p.w_dtype) {
    case DType::kFloat32: return launch<TX, float>(p, stream);
    case DType::kBFloat16: return launch<TX, bf16_t>(p, stream);
    case DType::kInt8: return launch<TX, int8_t>(p, stream);
    default: break;
  }
  throw std::invalid_argument("linear_cuda: unsupported weight dtype");
}

}  // namespace

void linear_cuda(const LinearParams& p, void* stream) {
  if (p.M == 0 || p.N == 0) return;
  // Panels are a CPU layout (linear.h); the bindings refuse them on CUDA before this.
  if (p.w_packed) throw std::invalid_argument("linear_cuda: packed weights are CPU-only");
  auto s = static_cast<cudaStream_t>(stream);
  if (p.x_dtype == DType::kFloat32) return dispatch_weights<float>(p, s);
  if (p.x_dtype == DType::kBFloat16) return dispatch_weights<bf16_t>(p, s);
  throw std::invalid_argument("linear_cuda: unsupported activation dtype");
}

}  // namespace cm3rt
