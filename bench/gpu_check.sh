#!/usr/bin/env bash
# One-call GPU check for a bare GPU machine (torch 2.11 cu130 installed, nothing else, no
# network), in under 8 minutes on an H100 / H200, one table printed last:
#   install  the wheels tools/prepare_gpu_wheels.sh prepared in .whl/ (no index, no network)
#   build    cm3rt for sm_90a from this checkout (tools/dev_build.sh) when nvcc is there,
#            else the sm_90a wheel prepared with the wheels
#   verify   the module sees the GPU and was built for 90a
#   tests    pytest -m cuda (every CUDA test of tests/)
#   cupy     the DLPack interop test with cupy arrays (tests/test_cupy_interop.py)
#   bench    the kernel benchmarks on the device (bench/, derived numbers)
#   decode   the 7B-shaped decode step (bf16, 4 CFG pairs) against the weight-bytes floor
#   tp       with two or more GPUs only: TP = 1 vs TP = 2 decode step (bench/bench_tp.py,
#            NCCL), 90 s more than the single-GPU budget
# Each step runs under its own time limit (they sum to at most 8 minutes); logs go to $OUT
# (default ./gpu_check_out/). A failed step does not stop the later ones.
#   bash bench/gpu_check.sh            # on the GPU machine
#   bash bench/gpu_check.sh --dry-run  # anywhere: checks the wheels and prints the plan
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
out="${OUT:-gpu_check_out}"
whl="${CM3RT_WHEELS:-.whl}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=python3
start=$(date +%s)

names=() limits=() statuses=() secs=() results=()
budget=480
# step NAME LIMIT_S RESULT_FN COMMAND: runs COMMAND under `timeout LIMIT_S` (log: $out/NAME.log)
# and records a table row; RESULT_FN prints the row's result from the log.
step() {
  local name=$1 limit=$2 result_fn=$3 cmd=$4
  names+=("$name") limits+=("$limit")
  if [ "$dry" = 1 ]; then
    echo "[dry-run] $name (limit ${limit}s): $cmd"
    statuses+=("dry-run") secs+=(0) results+=("-")
    return 0
  fi
  echo "== $name (limit ${limit}s)"
  local t0 rc
  t0=$(date +%s)
  timeout "$limit" bash -c "$cmd" > "$out/$name.log" 2>&1
  rc=$?
  secs+=($(( $(date +%s) - t0 )))
  case $rc in
    0) statuses+=("ok");;
    124) statuses+=("TIMEOUT");;
    *) statuses+=("FAILED rc=$rc");;
  esac
  results+=("$($result_fn "$out/$name.log" 2>/dev/null | tr '\n' ' ' | cut -c1-110)")
  tail -3 "$out/$name.log"
}

last_line() { tail -1 "$1"; }
pytest_counts() { grep -E "[0-9]+ (passed|failed|error)" "$1" | tail -1; }
# The rows of bench/conftest.py's "derived benchmark numbers" table, optionally those of one bench.
derived() {
  "$py" - "$1" "${2:-}" <<'EOF'
import re, sys
lines = open(sys.argv[1]).read().splitlines()
try:
    i = next(k for k, l in enumerate(lines) if "derived benchmark numbers" in l)
except StopIteration:
    sys.exit(0)
head = re.split(r"\s{2,}", lines[i + 1].strip())
rows = [dict(zip(head, re.split(r"\s{2,}", l.strip()))) for l in lines[i + 2:] if l.strip()]
want = sys.argv[2]
if want:
    for r in rows:
        if r.get("bench") == want:
            print(" ".join(f"{k}={v}" for k, v in r.items() if k in
                           ("tp", "step_ms", "vs_tp1", "floor_ms", "ratio", "weights_GB",
                            "target")))
else:
    print(f"{len(rows)} benchmark rows (table in bench.log)")
EOF
}
decode_row() { derived "$1" decode_step_7b; }
tp_rows() { derived "$1" tp_decode_step; }
# For tests/test_gpu_check.py: the result parser alone, on a saved log.
if [ "${1:-}" = "--parse-derived" ]; then
  derived "$2" "${3:-}"
  exit 0
fi

# ---- the plan ---------------------------------------------------------------------------------
deps_n=$(ls "$whl"/deps/*.whl 2>/dev/null | wc -l)
wheel=$(ls "$whl"/cm3rt-*.whl 2>/dev/null | head -1)
echo "wheels: $deps_n dependency wheels in $whl/deps, cm3rt wheel: ${wheel:-none}"
[ -f "$whl/MANIFEST" ] && head -2 "$whl/MANIFEST"
if [ "$deps_n" = 0 ]; then
  echo "gpu_check: no wheels in $whl/deps: run tools/prepare_gpu_wheels.sh on a machine with network first" >&2
  [ "$dry" = 1 ] || exit 2
fi
if command -v nvcc >/dev/null 2>&1; then
  build="CM3RT_CUDA_ARCHS=90a CMAKE_BUILD_PARALLEL_LEVEL=\$(nproc) tools/dev_build.sh"
elif [ -n "$wheel" ]; then
  # The prebuilt module, unpacked into this checkout (which the tests import).
  build="$py -c \"import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); [open('cm3rt/' + n.split('/')[-1], 'wb').write(z.read(n)) for n in z.namelist() if n.startswith('cm3rt/_C')]\" '$wheel'"
else
  build="echo 'no nvcc and no prebuilt cm3rt wheel in $whl' >&2; false"
fi

step install 45 last_line "$py -m pip install -q --no-index --no-deps $whl/deps/*.whl && { $py -m pip check | grep -v -i -E 'torch|nvidia|triton'; true; }"
step build 150 last_line "$build"
step verify 10 last_line "$py -c \"import cm3rt.ops as o; i = o.build_info(); print(i['summary'], 'devices', i['cuda_devices']); assert i['cuda'] and i['cuda_devices'] > 0 and '90a' in i['cuda_archs']\""
# A test module whose imports are missing here is reported as a collection error; the rest run.
step tests 100 pytest_counts "$py -m pytest -q -m cuda tests -p no:cacheprovider --continue-on-collection-errors --ignore=tests/test_cupy_interop.py"
step cupy 15 pytest_counts "$py -m pytest -q tests/test_cupy_interop.py -p no:cacheprovider"
step bench 70 derived "$py -m pytest -q -s bench -p no:cacheprovider --bench-device cuda --benchmark-disable --ignore=bench/bench_engine.py --ignore=bench/bench_retrieval.py --ignore=bench/bench_serve.py --ignore=bench/bench_linear.py --ignore=bench/bench_tp.py"
step decode 80 decode_row "$py -m pytest -q -s bench/bench_engine.py -k decode_step_vs_bandwidth_floor -p no:cacheprovider --bench-device cuda --benchmark-disable"
gpus=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
if [ "${gpus:-0}" -ge 2 ]; then
  budget=$((budget + 90))
  step tp 90 tp_rows "$py -m pytest -q -s bench/bench_tp.py -p no:cacheprovider --bench-device cuda --benchmark-disable"
else
  echo "tp: skipped (TP = 2 needs two GPUs; ${gpus:-0} visible)"
fi

total_limit=0
for l in "${limits[@]}"; do total_limit=$((total_limit + l)); done
if [ "$total_limit" -gt "$budget" ]; then
  echo "gpu_check: the step limits sum to ${total_limit}s, over the ${budget}s budget" >&2
  exit 3
fi

# ---- the table, last --------------------------------------------------------------------------
[ "$dry" = 1 ] || nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1
echo
echo "== gpu_check summary ($(git rev-parse --short HEAD 2>/dev/null || echo '?'), total $(( $(date +%s) - start ))s of ${total_limit}s limits)"
printf '%-8s %-14s %6s  %s\n' step status seconds result
for i in "${!names[@]}"; do
  printf '%-8s %-14s %6s  %s\n' "${names[$i]}" "${statuses[$i]}" "${secs[$i]}" "${results[$i]}"
done
for s in "${statuses[@]}"; do
  case "$s" in ok|dry-run) ;; *) exit 1;; esac
done
