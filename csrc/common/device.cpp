// Host-side build facts; the CUDA-dependent halves live in device_cuda.cu.
#include "common/device.h"

#include <omp.h>

#include <stdexcept>

namespace cm3rt {

bool built_with_cuda() { return CM3RT_WITH_CUDA != 0; }

std::string cuda_archs() {
#if CM3RT_WITH_CUDA
  return CM3RT_CUDA_ARCHS_STR;
#else
  return "";
#endif
}

std::string simd_level() {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  return "avx512+bf16";  // VDPBF16PS: the linear kernel's bf16 x bf16 tile
#elif defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2+fma";
#elif defined(__AVX__)
  return "avx";
#elif defined(__ARM_NEON)
  return "neon";
#elif defined(__SSE2__)
  return "sse2";
#else
  return "scalar";
#endif
}

std::string build_info_string() {
  std::string s = "cuda=" + std::string(built_with_cuda() ? "yes" : "no");
  if (built_with_cuda()) s += " archs=" + cuda_archs();
  s += " simd=" + simd_level();
  s += " omp_threads=" + std::to_string(omp_get_max_threads());
  return s;
}

#if !CM3RT_WITH_CUDA
int cuda_device_count() { return 0; }
int cuda_sm_count(int) { return 0; }
void check_cuda_launch(const char*) {}
void copy_device_to_host(void*, const void*, size_t) {
  throw std::runtime_error("copy_device_to_host: cm3rt was built without CUDA");
}
#endif

}  // namespace cm3rt
