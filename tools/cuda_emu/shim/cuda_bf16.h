// Emulator shim: cm3rt kernels use their own 16-bit types (common/dtype.h).
#pragma once
#include "cuda_runtime.h"
