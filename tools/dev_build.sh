#!/usr/bin/env bash
# Developer build: compiles cm3rt._C straight into ./cm3rt/ (no pip), incrementally.
#   tools/dev_build.sh            # CPU + CUDA (if nvcc is found)
#   CM3RT_CPU_ONLY=1 tools/dev_build.sh   # fast CPU-only iteration
set -euo pipefail
cd "$(dirname "$0")/.."
flag() { case "${!1:-0}" in ""|0|false|OFF) echo OFF;; *) echo ON;; esac; }
build_dir="build/dev-$( [ "$(flag CM3RT_CPU_ONLY)" = ON ] && echo cpu || echo cuda )"
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE="${CM3RT_BUILD_TYPE:-Release}" \
  -DPython_EXECUTABLE="$(command -v python3)" \
  -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" \
  -DCM3RT_OUTPUT_DIR="$PWD/cm3rt" \
  -DCM3RT_CPU_ONLY="$(flag CM3RT_CPU_ONLY)" -DCM3RT_PORTABLE="$(flag CM3RT_PORTABLE)" \
  -DCM3RT_CUDA_ARCHS="${CM3RT_CUDA_ARCHS:-80;90a}" >/dev/null
cmake --build "$build_dir"
