#!/usr/bin/env bash
# One-call GPU check: build the extension for the local GPU, run the CUDA tests, run the
# benchmarks on the device, print a short table last. Meant to finish in well under 8
# minutes on an H100/H200. Writes logs to $OUT (when set) or ./gpu_check_out/.
#   bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
arch="${CM3RT_CUDA_ARCHS:-90a}"
echo "== build (archs $arch)"
start=$(date +%s)
CM3RT_CUDA_ARCHS="$arch" tools/dev_build.sh 2>&1 | tail -5 | tee "$out/build.log"
echo "build: $(( $(date +%s) - start )) s"
python3 -c "import cm3rt.ops as o; print(o.build_info())" || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true

echo "== CUDA tests"
timeout 150 python3 -m pytest -q -x -m cuda tests -p no:cacheprovider 2>&1 | tee "$out/tests.log" | tail -25

echo "== kernel and model benchmarks"
timeout 120 python3 -m pytest -q -s bench -p no:cacheprovider --bench-device cuda \
  --benchmark-disable --ignore=bench/bench_engine.py --ignore=bench/bench_retrieval.py \
  --ignore=bench/bench_serve.py --ignore=bench/bench_linear.py \
  2>&1 | tee "$out/bench.log" | sed -n '/derived benchmark numbers/,$p'
echo "== engine benchmark (cm3rt vs HF, 7B-shaped decode step vs bandwidth floor)"
timeout 120 python3 -m pytest -q -s bench/bench_engine.py -p no:cacheprovider \
  --bench-device cuda --benchmark-disable 2>&1 | tee "$out/bench_engine.log" | tail -15
echo "== summary"
grep -E "passed|failed|error" "$out/tests.log" | tail -1
echo "total: $(( $(date +%s) - start )) s"
