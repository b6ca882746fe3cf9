// The one place a CUDA kernel is launched. Every launcher in csrc/ calls
//   cuda::launch<kernel>(grid, block, dynamic_smem_bytes, stream, args...);
// instead of writing kernel<<<grid, block, smem, stream>>>(args...). Under nvcc this is that
// launch; in the emulator build (CM3RT_EMU, tools/cuda_emu/) it runs the same kernel on the
// CPU, one fiber per CUDA thread, with the same grid, block and shared-memory size, so the
// host launch code and planners are exercised unchanged and `<<<>>>` (not C++) never has to
// be parsed by g++.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <tuple>
#include <utility>

#if defined(CM3RT_EMU)
#include "emu.h"
#endif

namespace cm3rt::cuda {

template <auto Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
#if defined(CM3RT_EMU)
  (void)stream;
  // The arguments are converted to the kernel's parameter types here, as a CUDA launch
  // does; each emulated thread then calls the kernel with its own by-value copy.
  auto params = std::make_tuple(static_cast<std::decay_t<Args>>(args)...);
  using Params = decltype(params);
  emu::launch(emu::kernel_name_of(__PRETTY_FUNCTION__), reinterpret_cast<const void*>(Kernel),
              grid, block, smem, &params, sizeof(params),
              [](void* p) { std::apply(Kernel, *static_cast<Params*>(p)); });
#else
  Kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
#endif
}

// Raises the kernel's dynamic shared memory limit; false when the device cannot give it.
template <typename Kernel>
bool set_max_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return true;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)) !=
      cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it, the caller reports
    return false;
  }
  return true;
}

}  // namespace cm3rt::cuda
