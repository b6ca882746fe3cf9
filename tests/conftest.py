"""Shared pytest fixtures: devices to parametrise over (CUDA skipped without a GPU; "emu",
the CUDA kernels under the CPU emulator, skipped when cm3rt._emu is not built)."""

from __future__ import annotations

import os

import pytest
import torch

# A failing engine step raises in the tests instead of failing only its requests, so a
# programming error never hides behind a failed request (Engine.raise_step_errors).
os.environ["CM3RT_RAISE_STEP_ERRORS"] = "1"

from device_kinds import EMU, EmulatedDevice

from cm3rt import ops
from cm3rt.devices import cuda_usable

CUDA_READY = cuda_usable()


def _emu_built() -> bool:
    try:
        from cm3rt import _emu  # noqa: F401
    except ImportError:
        # CI builds the emulator (.ci/run) and sets CM3RT_REQUIRE_EMU: there a missing module
        # is an error, not a skip.
        if os.environ.get("CM3RT_REQUIRE_EMU"):
            raise
        return False
    return True


EMU_READY = _emu_built()

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda,
               pytest.mark.skipif(not CUDA_READY, reason="no CUDA device (or cm3rt built without CUDA)")],
    ),
    pytest.param(
        EMU,
        marks=[pytest.mark.emu,
               pytest.mark.skipif(not EMU_READY, reason="cm3rt._emu not built (tools/cuda_emu/build.sh)")],
    ),
]


def _enter(name: str):
    if name == EMU:
        if not EMU_READY:
            pytest.skip("cm3rt._emu not built (tools/cuda_emu/build.sh)")
        # The CUDA kernels under the CPU emulator: tensors live in host memory ("cpu" to
        # torch) and every op goes through cm3rt._emu for the test's duration.
        with ops.emulated():
            yield EmulatedDevice()
        return
    if name == "cuda" and not CUDA_READY:
        pytest.skip("no CUDA device (or cm3rt built without CUDA)")
    yield name


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    yield from _enter(request.param)


@pytest.fixture
def device_for():
    """For fixtures with their own device lists: device_for(name) is the generator that
    `device` uses (skips a missing device, routes "emu" through the emulator)."""
    return _enter


@pytest.fixture(scope="module")
def one_torch_thread():
    """Runs a module with one torch thread: its GEMMs are tiny, and extra threads only add
    spin-waits on a shared 2-core machine. Use with pytest.mark.usefixtures."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
