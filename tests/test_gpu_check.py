"""bench/gpu_check.sh and tools/prepare_gpu_wheels.sh, as far as they run without a GPU: the
plan (--dry-run) fits the 8-minute budget and runs every required check; the result parser
reads the benchmark table; the wheel set holds what the bare GPU machine lacks and not torch."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path, **env):
    e = {**os.environ, "OUT": str(tmp_path / "out"), **env}
    return subprocess.run(["bash", *args], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=120, check=False)


def test_dry_run_plans_every_check_within_budget(tmp_path):
    whl = tmp_path / "whl"
    (whl / "deps").mkdir(parents=True)
    (whl / "deps" / "numpy-2.0-cp311-cp311-manylinux_2_28_x86_64.whl").touch()
    (whl / "cm3rt-0.1.0-cp311-cp311-linux_x86_64.whl").touch()
    r = _run(["bench/gpu_check.sh", "--dry-run"], tmp_path, CM3RT_WHEELS=str(whl))
    assert r.returncode == 0, r.stderr
    plan = {line.split()[1]: line for line in r.stdout.splitlines() if line.startswith("[dry-run]")}
    assert list(plan) == ["install", "build", "verify", "tests", "cupy", "bench", "decode"]
    assert "--no-index" in plan["install"] and str(whl) in plan["install"]
    assert "90a" in plan["build"] and "90a" in plan["verify"]
    assert "-m cuda tests" in plan["tests"]
    assert "test_cupy_interop.py" in plan["cupy"]
    assert "--bench-device cuda" in plan["bench"]
    assert "decode_step_vs_bandwidth_floor" in plan["decode"]
    limits = [int(line.split("(limit ")[1].split("s)")[0]) for line in plan.values()]
    assert sum(limits) <= 480  # 8 minutes, all steps at their limits
    table = r.stdout.strip().splitlines()[-8:]  # the summary table comes last
    assert table[0].split() == ["step", "status", "seconds", "result"]
    assert [row.split()[0] for row in table[1:]] == list(plan)


def test_dry_run_without_wheels_says_what_to_run(tmp_path):
    r = _run(["bench/gpu_check.sh", "--dry-run"], tmp_path, CM3RT_WHEELS=str(tmp_path / "none"))
    assert r.returncode == 0
    assert "tools/prepare_gpu_wheels.sh" in r.stderr


def test_result_parser_reads_the_derived_table(tmp_path):
    log = tmp_path / "bench.log"
    log.write_text(
        "...\n======== cm3rt derived benchmark numbers ========\n"
        "bench           device  streams  step_ms  floor_ms  ratio  weights_GB  decode_steps  target\n"
        "decode_step_7b  cuda    8        3.912    3.301     1.19   13.48       120           <=1.3x\n")
    r = _run(["bench/gpu_check.sh", "--parse-derived", str(log), "decode_step_7b"], tmp_path)
    assert r.stdout.split() == ["step_ms=3.912", "floor_ms=3.301", "ratio=1.19",
                                "weights_GB=13.48", "target=<=1.3x"]
    r = _run(["bench/gpu_check.sh", "--parse-derived", str(log)], tmp_path)
    assert r.stdout.startswith("1 benchmark rows")


def test_wheel_set_has_the_test_deps_and_cupy_but_not_torch(tmp_path):
    r = _run(["tools/prepare_gpu_wheels.sh", "--list", "--torch", "2.11"], tmp_path)
    assert r.returncode == 0, r.stderr
    names = {line.split("==")[0] for line in r.stdout.split()}
    assert {"pytest", "numpy", "scipy", "transformers", "safetensors", "cupy-cuda13x",
            "pybind11", "cmake", "ninja"} <= names
    assert "torchvision==0.26.*" in r.stdout.split()  # open_clip's, paired with torch 2.11
    assert not any(n == "torch" or n.startswith(("nvidia-", "triton")) for n in names)


def test_minimal_wheel_set_is_what_the_cuda_checks_import(tmp_path):
    r = _run(["tools/prepare_gpu_wheels.sh", "--list", "--minimal"], tmp_path)
    assert r.returncode == 0, r.stderr
    names = {line.split("==")[0] for line in r.stdout.split()}
    assert {"pytest", "pytest-benchmark", "numpy", "scipy", "transformers", "cupy-cuda13x"} <= names
    assert not names & {"torch", "faiss-cpu", "open-clip-torch", "fastapi"}
