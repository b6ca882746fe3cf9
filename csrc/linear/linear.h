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

// Packed weights ("panels", linear_pack in cm3rt/ops.py): [N, K] regrouped once at load
// into ceil(N / 16) panels of 16 output channels, each [ceil(K / g), 16, g]:
//   packed[p][kk][c * g + i] = w[16 p + c][g kk + i]   (zero past N and past K)
// with g = 1 for float32 and 2 for bfloat16 and int8 (the element pairs VDPBF16PS and
// VPDPWSSD multiply). One vector load then holds 16 channels' next g elements of K, and x
// is broadcast a row at a time: every weight byte feeds 8 rows of multiply-adds while x
// stays in L1, where the [N, K] layout has to stream 16 x values per 16 multiply-adds
// (on AMD Zen 4, M = 8, one thread, 2816 x 1024: fp32 ~1100 -> ~440 us, bf16 ~400 -> ~230,
// int8 ~460 -> ~220; bench/bench_linear.py).
constexpr int kPanelChannels = 16;
inline int panel_group(DType w_dtype) { return w_dtype == DType::kFloat32 ? 1 : 2; }

struct LinearParams {
  const void* x;          // [M, K] activations, last dim contiguous
  int64_t x_stride;       // elements between rows of x
  DType x_dtype;          // float32 or bfloat16 (out has the same dtype)
  const void* w;          // [N, K] weights (out-features first), last dim contiguous,
                          // or panels (w_packed, above; contiguous)
  int64_t w_stride;       // elements between rows of w (unused for panels)
  bool w_packed = false;  // w holds panels
  DType w_dtype;          // float32, bfloat16 or int8
  const float* scales;    // [N] per-output-channel scales (int8 weights), else nullptr
  void* out;              // [M, N], last dim contiguous
  int64_t out_stride;     // elements between rows of out
  int M, N, K;
};

void linear_cpu(const LinearParams& p);

// The CPU kernels this build and machine have, best first: "amx" (bf16 and int8 weights),
// "avx512", "avx2" (packed weights; on [N, K] weights the same 8-lane loop as "portable"),
// "portable" (8-lane vectors; always there). linear_cpu uses the best one that
// takes the dtypes, at most the one set_linear_cpu_kernel chose (tests and benchmarks
// compare them; "" restores the best). Throws std::invalid_argument for another name.
std::vector<std::string> linear_cpu_kernels();
void set_linear_cpu_kernel(const std::string& name);
// The "x/weight" dtype pairs (e.g. "bfloat16/int8") linear_cpu runs on packed weights with a
// vector kernel here; other pairs take the portable panel loop (correct, not fast).
std::vector<std::string> linear_cpu_packed_fast_pairs();
void linear_cuda(const LinearParams& p, void* stream);

}  // namespace cm3rt
