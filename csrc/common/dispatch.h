// dtype / head-dim dispatch (flash-attention style): turns a runtime value into a
// compile-time type or constant for the body, with a clear error in the default case.
//
//   CM3RT_DISPATCH_FLOAT(params.dtype, "paged_attention", scalar_t, [&] { run<scalar_t>(p); });
//   CM3RT_DISPATCH_HEAD_DIM(params.D, "paged_attention", kHeadDim, [&] { run<kHeadDim>(p); });
#pragma once

#include <stdexcept>
#include <string>

#include "common/dtype.h"

namespace cm3rt {

[[noreturn]] inline void throw_unsupported(const char* op, const char* what, const std::string& got,
                                           const char* supported) {
  throw std::invalid_argument(std::string(op) + ": unsupported " + what + " " + got +
                              " (supported: " + supported + ")");
}

}  // namespace cm3rt

#define CM3RT_DISPATCH_FLOAT(DTYPE, OP, T, ...)                                       \
  [&] {                                                                               \
    switch (DTYPE) {                                                                  \
      case ::cm3rt::DType::kFloat32: { using T = float; return __VA_ARGS__(); }       \
      case ::cm3rt::DType::kFloat16: { using T = ::cm3rt::half_t; return __VA_ARGS__(); } \
      case ::cm3rt::DType::kBFloat16: { using T = ::cm3rt::bf16_t; return __VA_ARGS__(); } \
      default:                                                                        \
        ::cm3rt::throw_unsupported(OP, "dtype", ::cm3rt::dtype_name(DTYPE),           \
                                   "float32, float16, bfloat16");                     \
    }                                                                                 \
  }()

#define CM3RT_HEAD_DIM_CASE(N, K, ...) case N: { constexpr int K = N; return __VA_ARGS__(); }

#define CM3RT_DISPATCH_HEAD_DIM(D, OP, K, ...)                                        \
  [&] {                                                                               \
    switch (D) {                                                                      \
      CM3RT_HEAD_DIM_CASE(32, K, __VA_ARGS__)                                         \
      CM3RT_HEAD_DIM_CASE(64, K, __VA_ARGS__)                                         \
      CM3RT_HEAD_DIM_CASE(80, K, __VA_ARGS__)                                         \
      CM3RT_HEAD_DIM_CASE(96, K, __VA_ARGS__)                                         \
      CM3RT_HEAD_DIM_CASE(128, K, __VA_ARGS__)                                        \
      CM3RT_HEAD_DIM_CASE(256, K, __VA_ARGS__)                                        \
      default:                                                                        \
        ::cm3rt::throw_unsupported(OP, "head dim", std::to_string(D),                 \
                                   "32, 64, 80, 96, 128, 256");                       \
    }                                                                                 \
  }()

// The head dims every attention kernel supports (kept in sync with the switch above).
#define CM3RT_SUPPORTED_HEAD_DIMS "32, 64, 80, 96, 128, 256"
