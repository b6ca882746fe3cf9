"""Shared pytest fixtures: devices to parametrise over (CUDA skipped without a GPU)."""

from __future__ import annotations

import os

import pytest
import torch

# A failing engine step raises in the tests instead of failing only its requests, so a
# programming error never hides behind a failed request (Engine.raise_step_errors).
os.environ["CM3RT_RAISE_STEP_ERRORS"] = "1"

from cm3rt.devices import cuda_usable

CUDA_READY = cuda_usable()

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda,
               pytest.mark.skipif(not CUDA_READY, reason="no CUDA device (or cm3rt built without CUDA)")],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def one_torch_thread():
    """Runs a module with one torch thread: its GEMMs are tiny, and extra threads only add
    spin-waits on a shared 2-core machine. Use with pytest.mark.usefixtures."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
