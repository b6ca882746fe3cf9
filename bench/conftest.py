"""Benchmark session plumbing: a device fixture and the derived-numbers table at the end."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS


def pytest_addoption(parser):
    parser.addoption("--bench-device", default=None,
                     help="cpu or cuda (default: cuda when available, else cpu)")


@pytest.fixture(scope="session")
def bench_device(request) -> str:
    dev = request.config.getoption("--bench-device")
    if dev is None:
        from cm3rt.devices import default_device

        dev = default_device()
    return dev


@pytest.fixture(scope="session")
def mid_model_dir(tmp_path_factory) -> Path:
    """The mid-size Chameleon of bench_engine.py (random weights saved by HF), written once
    per session for every benchmark that uses it."""
    from bench_engine import MID, write_model_dir

    return write_model_dir(tmp_path_factory.mktemp("bench") / "mid", MID)


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("cm3rt derived benchmark numbers")
    keys: list[str] = []
    for row in RESULTS:
        for k in row:
            if k not in keys:
                keys.append(k)
    widths = {k: max(len(k), *(len(str(r.get(k, ""))) for r in RESULTS)) for k in keys}
    tr.write_line("  ".join(k.ljust(widths[k]) for k in keys))
    for r in RESULTS:
        tr.write_line("  ".join(str(r.get(k, "")).ljust(widths[k]) for k in keys))
