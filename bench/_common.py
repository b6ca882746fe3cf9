"""Shared benchmark helpers: robust timing, the machine's copy and read bandwidths, result table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device="cpu", min_time: float = 0.3, min_reps: int = 3,
            max_reps: int = 200) -> float:
    """Median seconds of fn() after one warm-up, repeated for >= min_time (and >= min_reps)."""
    fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


_COPY_BW: dict[str, float] = {}


def copy_bandwidth(device="cpu", nbytes: int = 256 << 20) -> float:
    """Bytes/s of a large device-to-same-device copy (read + write counted), measured once."""
    key = str(torch.device(device))
    if key not in _COPY_BW:
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
        dst = torch.empty_like(src)
        t = time_fn(lambda: dst.copy_(src), device, min_time=0.5)
        _COPY_BW[key] = 2 * nbytes / t
    return _COPY_BW[key]


_READ_BW: dict[tuple[str, int], float] = {}


def read_bandwidth(device="cpu", nbytes: int = 512 << 20, *, remeasure: bool = False) -> float:
    """Bytes/s of reading a buffer far larger than the caches once (a sum or a dot), measured
    once per device and thread count (``remeasure``: again, keeping the fastest so far, so a
    benchmark can measure before and after its timed run and a neighbour's load during one
    measurement does not lower the floor). A decode step's weights are read, not copied: a
    copy's read rate (half its bytes/s) is lower than a pure read's, because the copy's writes
    share the memory bus, so a floor taken from it is not a floor."""
    key = (str(torch.device(device)), torch.get_num_threads())
    if key not in _READ_BW or remeasure:
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
        # the faster of two reading kernels: the floor must not be slowed by either's compute
        t = min(time_fn(lambda: src.sum(), device, min_time=0.5),
                time_fn(lambda: torch.dot(src, src), device, min_time=0.5))
        _READ_BW[key] = max(nbytes / t, _READ_BW.get(key, 0.0))
    return _READ_BW[key]


RESULTS: list[dict] = []


def record(**row) -> None:
    """Adds a row to the table printed at the end of the benchmark session."""
    RESULTS.append(row)
    print("  ".join(f"{k}={v}" for k, v in row.items()))


def result_of(stdout: str) -> dict | None:
    """The JSON of the last ``RESULT {...}`` line a benchmark worker process printed."""
    import json

    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):]) if lines else None
