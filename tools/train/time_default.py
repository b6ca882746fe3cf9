#!/usr/bin/env python3
"""Process start -> PNG written, for ``cm3rt generate PROMPT -o x.png`` with no flags.

    python tools/train/time_default.py [--runs 3] [--prompt "a red circle"] [-- EXTRA ARGS]

Runs the command in a fresh Python process ``--runs`` times (imports, loading the default
model, CLIP and bank, retrieval, CFG sampling and VQGAN decoding all included) and prints
each wall time and the median. The start-up target is <= 5 s on this machine. Extra
arguments after ``--`` go to ``cm3rt generate`` (e.g. ``-- --model DIR``).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def time_once(prompt: str, out: Path, extra: list[str], threads: int | None
              ) -> tuple[float, float]:
    """(wall, CPU) seconds from process start to the PNG written (its exit included).

    The CPU seconds are what the wall time would be on an idle core for a single-threaded
    run: on a machine shared with other jobs they are the steadier number."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    out.unlink(missing_ok=True)
    c0, t0 = _children_cpu(), time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "cm3rt", "generate", prompt, "-o", str(out),
                        "--no-progress", *extra], cwd=REPO, env=env, capture_output=True,
                       text=True, check=False)
    dt, cpu = time.perf_counter() - t0, _children_cpu() - c0
    if r.returncode != 0 or not out.is_file():
        raise RuntimeError(f"cm3rt generate failed (exit {r.returncode}): {r.stderr.strip()}")
    return dt, cpu


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--prompt", default="a red circle above a blue square")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS of the timed process (default: inherited)")
    a = p.parse_args(argv)
    if a.runs < 1:
        p.error(f"--runs must be >= 1, got {a.runs}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "x.png"
        times, cpus = [], []
        for i in range(a.runs):
            wall, cpu = time_once(a.prompt, out, extra, a.threads)
            times.append(wall)
            cpus.append(cpu)
            print(f"run {i + 1}: wall {wall:.2f} s, CPU {cpu:.2f} s", flush=True)
    print(f"process start -> PNG: median wall {statistics.median(times):.2f} s over {a.runs} "
          f"runs (min {min(times):.2f}, max {max(times):.2f}), median CPU "
          f"{statistics.median(cpus):.2f} s; target <= 5 s wall; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
