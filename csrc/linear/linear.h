// Weight-streaming linear layer for few rows: out[m, n] = scale[n] * sum_k x[m, k] * w[n, k].
//
// A decode step multiplies a handful of rows (streams) by every weight matrix once, so its
// cost is reading the weights: the kernels stream each weight row from memory once per call
// and reuse it for all M rows (M <= 64 is the regime this is for; prefill-sized M also works,
// in blocks of 64 rows). Weights are float32, bfloat16, or int8 weight-only with a float32
// scale per output channel (symmetric, scale = max|w_row| / 127); accumulation is fp32.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/dtype.h"

namespace cm3rt {

constexpr int kLinearRowBlock = 64;  // rows of x one pass over the weights serves

struct LinearParams {
  const void* x;          // [M, K] activations, last dim contiguous
  int64_t x_stride;       // elements between rows of x
  DType x_dtype;          // float32 or bfloat16 (out has the same dtype)
  const void* w;          // [N, K] weights (out-features first), last dim contiguous
  int64_t w_stride;       // elements between rows of w
  DType w_dtype;          // float32, bfloat16 or int8
  const float* scales;    // [N] per-output-channel scales (int8 weights), else nullptr
  void* out;              // [M, N], last dim contiguous
  int64_t out_stride;     // elements between rows of out
  int M, N, K;
};

void linear_cpu(const LinearParams& p);

// The CPU kernels this build and machine have, best first: "amx" (bf16 and int8 weights),
// "avx512", "portable" (8-lane vectors; always there). linear_cpu uses the best one that
// takes the dtypes, at most the one set_linear_cpu_kernel chose (tests and benchmarks
// compare them; "" restores the best). Throws std::invalid_argument for another name.
std::vector<std::string> linear_cpu_kernels();
void set_linear_cpu_kernel(const std::string& name);
void linear_cuda(const LinearParams& p, void* stream);

}  // namespace cm3rt
