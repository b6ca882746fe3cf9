// The AVX2 + FMA CPU linear kernel on packed weights (linear_cpu_panels_avx2.cpp);
// linear_cpu() tries it after the AVX-512 panel kernel, before the portable panel loop.
#pragma once

#include "linear/linear.h"

namespace cm3rt {

// Runs p (p.w_packed) and returns true, or returns false without touching anything when the
// build has no AVX2 + FMA, the dtype pair is not one it handles, or int8 weights meet
// NaN / inf in x (whose rows the portable loop keeps non-finite).
bool linear_cpu_panels_avx2(const LinearParams& p);
// Whether this build's AVX2 panel kernel runs (x_dtype, w_dtype) (NaN-free x for int8).
bool linear_cpu_panels_avx2_takes(DType x_dtype, DType w_dtype);

}  // namespace cm3rt
