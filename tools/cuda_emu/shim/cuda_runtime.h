// Emulation shim: the parts of the CUDA runtime API the attention sources use.
#pragma once
#include <cstddef>
#include <cstdint>
#include "emu.h"
