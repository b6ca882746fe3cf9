// CUDA device queries. With the static runtime and no driver, every query fails softly.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common/device.h"

namespace cm3rt {

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

int cuda_sm_count(int device) {
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

void check_cuda_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(op) + ": CUDA launch failed: " + cudaGetErrorString(err));
}

}  // namespace cm3rt

namespace cm3rt {

void copy_device_to_host(void* dst, const void* src, size_t bytes) {
  const cudaError_t err = cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost);
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("copy_device_to_host: ") + cudaGetErrorString(err));
}

}  // namespace cm3rt
