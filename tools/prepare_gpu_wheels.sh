#!/usr/bin/env bash
# Prepares, on a machine with network (and nvcc), everything bench/gpu_check.sh installs on a
# bare GPU machine that has only torch (2.11, cu130) and no network:
#   .whl/deps/      wheels of cm3rt's runtime + test dependencies (torch, triton and the
#                   nvidia-* CUDA libraries excluded: the GPU machine's torch brings its own),
#                   the build tools (cmake, ninja, pybind11, setuptools, wheel) and cupy-cuda13x
#                   for the DLPack interop test;
#   .whl/cm3rt-*.whl  cm3rt built here for sm_90a (static CUDA runtime), for a GPU machine
#                   without nvcc (gpu_check.sh builds from source when it has one);
#   .whl/MANIFEST   what was prepared, for which Python, from which commit.
# Then copy the checkout (with .whl/) to the GPU machine and run bash bench/gpu_check.sh.
#
#   tools/prepare_gpu_wheels.sh [--python 3.11] [--torch 2.11] [--minimal] [--no-cm3rt-wheel] [--list]
# --python: the GPU machine's Python (default: this one's); --torch: its torch (for the
# matching torchvision, which open_clip needs); --minimal: only what the CUDA checks import
# (pytest, numpy, scipy, transformers, cupy, ...: for a machine reached through a small file
# transfer; test modules needing more fail to collect and are reported, the rest run);
# --list: print the set and exit.
set -euo pipefail
cd "$(dirname "$0")/.."
pyver="$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
torch_minor=11  # torch 2.11 on the GPU machine: torchvision 0.26
build_wheel=1
list_only=0
roots="cm3rt"
while [ $# -gt 0 ]; do
  case "$1" in
    --python) pyver="$2"; shift 2;;
    --torch) torch_minor="${2#2.}"; torch_minor="${torch_minor%%.*}"; shift 2;;
    --no-cm3rt-wheel) build_wheel=0; shift;;
    --list) list_only=1; shift;;
    --minimal) roots="pytest pytest-benchmark numpy scipy transformers safetensors tokenizers pyyaml tqdm pillow"; shift;;
    *) echo "prepare_gpu_wheels: unknown argument $1" >&2; exit 2;;
  esac
done
out=.whl

# The dependency closure of cm3rt[test] as installed here (pinned to these versions, which the
# test suite passes with), without torch and what only torch needs.
deps=$(ROOTS="$roots" python3 - <<'EOF'
import os
import re
from importlib import metadata

# torch and its CUDA stack come with the GPU machine's torch; linters and the browser test's
# driver are not needed there.
SKIP = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*|cm3rt|playwright|"
                  r"taming-transformers|ruff|import-linter|grimp)$")
seen, todo = {}, os.environ["ROOTS"].split()
while todo:
    name = todo.pop()
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        continue
    key = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
    if key in seen or (SKIP.match(key) and key != "cm3rt"):
        continue
    seen[key] = dist.version
    for req in dist.requires or []:
        # cm3rt's own "test" extra is wanted; other packages' extras are not
        if "extra ==" in req and not (key == "cm3rt" and "'test'" in req.replace('"', "'")):
            continue
        todo.append(re.split(r"[ ;<>=!~\[(]", req.strip(), maxsplit=1)[0])
for key in sorted(seen):
    if not SKIP.match(key):
        print(f"{key}=={seen[key]}")
EOF
)
# + the build tools, cupy for the interop test, torchvision for open_clip (the torch release's
# pair: 0.(minor + 15)), and the VQGAN tests' reference model (as .ci/run installs it).
tools="cmake ninja pybind11 setuptools wheel"
[ "$roots" = cm3rt ] && tools="$tools torchvision==0.$((torch_minor + 15)).* taming-transformers==0.0.1"
if [ "$list_only" = 1 ]; then
  echo "$deps"
  echo "$tools cupy-cuda13x" | tr ' ' '\n'
  exit 0
fi

mkdir -p "$out/deps"
# One wheel per requirement, for the GPU machine's Python, no dependency resolution (the set
# above is already closed, and resolving would pull torch in).
# shellcheck disable=SC2086
target=(--only-binary=:all: --python-version "$pyver" --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64
        --platform manylinux_2_17_x86_64 --platform linux_x86_64 --platform any)
python3 -m pip download -q --no-deps "${target[@]}" -d "$out/deps" $deps $tools
# cupy with its own dependencies (none of them torch's).
python3 -m pip download -q "${target[@]}" -d "$out/deps" cupy-cuda13x
if [ "$build_wheel" = 1 ]; then
  # sm_90a only (H100 / H200), portable CPU code: the GPU machine's CPU is not this one.
  CM3RT_CUDA_ARCHS=90a CM3RT_PORTABLE=1 CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    python3 -m pip wheel -q --no-deps --no-build-isolation -w "$out" .
fi
{
  echo "python $pyver"
  echo "commit $(git rev-parse HEAD)"
  echo "prepared $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  ls "$out"/deps | sed 's/^/deps /'
  ls "$out"/cm3rt-*.whl 2>/dev/null | sed 's/^/wheel /' || true
} > "$out/MANIFEST"
echo "prepared $out/ for Python $pyver: $(ls "$out/deps" | wc -l) dependency wheels"
