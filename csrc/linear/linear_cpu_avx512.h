// The AVX-512 CPU linear kernels (linear_cpu_avx512.cpp on [N, K] weights,
// linear_cpu_panels_avx512.cpp on panels); linear_cpu() tries them before the portable loops.
#pragma once

#include "linear/linear.h"

namespace cm3rt {

// Runs p on the AVX-512 kernel and returns true, or returns false without touching
// anything when the build has no AVX-512 (or the dtype pair is not one it handles).
bool linear_cpu_avx512(const LinearParams& p);

// The same for packed weights (p.w_packed, linear_cpu_panels_avx512.cpp): false also for a
// dtype pair the build's instructions do not cover, or int8 weights with NaN / inf in x.
bool linear_cpu_panels_avx512(const LinearParams& p);
// Whether this build's panel kernel runs (x_dtype, w_dtype) (NaN-free x for int8).
bool linear_cpu_panels_avx512_takes(DType x_dtype, DType w_dtype);

}  // namespace cm3rt
