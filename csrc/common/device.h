// Device queries and CUDA error reporting, free of CUDA headers so bindings can include it.
#pragma once

#include <cstddef>
#include <string>

namespace cm3rt {

// Number of CUDA devices visible; 0 (never an error) without a GPU, a driver, or CUDA support.
int cuda_device_count();
// Streaming multiprocessor count of `device`, 0 when unknown.
int cuda_sm_count(int device);
// Throws std::runtime_error naming `op` when the last CUDA launch failed (no synchronisation).
void check_cuda_launch(const char* op);
// A short description of the build: CUDA yes/no, architectures, SIMD level, OpenMP threads.
std::string build_info_string();
bool built_with_cuda();
std::string cuda_archs();
std::string simd_level();

}  // namespace cm3rt

namespace cm3rt {
// Copies `bytes` from device memory to host memory and waits (a synchronising debug path
// used only for optional index validation of CUDA arguments). Throws on failure.
void copy_device_to_host(void* dst, const void* src, size_t bytes);
}  // namespace cm3rt
