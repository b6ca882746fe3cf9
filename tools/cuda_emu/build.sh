#!/usr/bin/env bash
# Builds cm3rt._emu (the CUDA kernels under the CPU emulator) into ./cm3rt/, incrementally.
#   tools/cuda_emu/build.sh        # then: pytest tests -k emu
# CMAKE_BUILD_PARALLEL_LEVEL sets the compile jobs (default 2).
set -euo pipefail
cd "$(dirname "$0")/../.."
build_dir=build/emu
cmake -S tools/cuda_emu -B "$build_dir" -G Ninja \
  -DPython_EXECUTABLE="$(command -v python3)" \
  -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" \
  -DCM3RT_OUTPUT_DIR="$PWD/cm3rt" >/dev/null
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" cmake --build "$build_dir"
# Every __tsan_* hook the instrumented kernels call must be the emulator's: an undefined one
# would be a memory access nobody checks (and a failed import).
so=$(ls cm3rt/_emu.*.so)
if nm -D --undefined-only "$so" | grep -q __tsan_; then
  echo "cuda_emu: undefined instrumentation hooks:" >&2
  nm -D --undefined-only "$so" | grep __tsan_ >&2
  exit 1
fi
