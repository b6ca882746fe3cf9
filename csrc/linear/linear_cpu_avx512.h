// The AVX-512 CPU linear kernel (linear_cpu_avx512.cpp); linear_cpu() tries it first.
#pragma once

#include "linear/linear.h"

namespace cm3rt {

// Runs p on the AVX-512 kernel and returns true, or returns false without touching
// anything when the build has no AVX-512 (or the dtype pair is not one it handles).
bool linear_cpu_avx512(const LinearParams& p);

}  // namespace cm3rt
