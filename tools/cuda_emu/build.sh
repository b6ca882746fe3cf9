#!/usr/bin/env bash
# Builds and runs the CUDA paged-attention sources on the CPU under a small SIMT emulator
# (each CUDA thread a fiber; ldmatrix, mma.m16n8k16, shuffles, cp.async per the PTX ISA),
# against a float64 reference. A pre-GPU check of index arithmetic and fragment layouts,
# not a substitute for the GPU tests: the emulator encodes one reading of the PTX semantics.
#   bash tools/cuda_emu/build.sh && /tmp/cm3rt_cuda_emu/harness
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
src="$here/../../csrc"
obj="${EMU_BUILD_DIR:-/tmp/cm3rt_cuda_emu}"
mkdir -p "$obj"
flags="-std=c++20 -O1 -g -Wno-unknown-pragmas -I$here/shim -I$here -I$src -include $here/emu.h"
for f in paged_attention_cuda prefill_mma_f16 prefill_mma_bf16 prefill_simt decode_split_kv; do
  g++ $flags -x c++ -c "$src/attention/$f.cu" -o "$obj/$f.o" &
done
g++ $flags -c "$src/attention/paged_attention_plan.cpp" -o "$obj/plan.o" &
g++ $flags -c "$here/emu.cpp" -o "$obj/emu.o" &
g++ $flags -c "$here/harness.cpp" -o "$obj/harness.o" &
wait
g++ "$obj"/*.o -o "$obj/harness"
echo "built $obj/harness"
