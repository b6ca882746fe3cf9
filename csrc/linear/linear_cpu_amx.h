// The AMX CPU linear kernel (linear_cpu_amx.cpp); linear_cpu() tries it first.
#pragma once

#include "linear/linear.h"

namespace cm3rt {

// True when the build has the AMX kernel and this process may use the tiles (CPU flags and
// the OS's permission, asked for once).
bool linear_cpu_amx_available();

// Runs p on AMX and returns true (bf16 weights with bf16 x; int8 weights with fp32 or bf16
// x), or returns false without touching anything.
bool linear_cpu_amx(const LinearParams& p);

}  // namespace cm3rt
