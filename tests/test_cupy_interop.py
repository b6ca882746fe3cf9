"""DLPack interop with a producer other than torch: cupy arrays straight into the CUDA
kernels of cm3rt._C (the bindings take any DLPack producer; see python/tensor_arg.h), checked
against torch on the same data. Needs a GPU and cupy (bench/gpu_check.sh installs
cupy-cuda13x from the prepared wheels); skipped otherwise."""

from __future__ import annotations

import pytest
import torch
from conftest import CUDA_READY

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not CUDA_READY, reason="no CUDA device (or cm3rt built without CUDA)")]


@pytest.fixture(scope="module")
def cp():
    return pytest.importorskip("cupy")


def test_linear_and_vq_embed_on_cupy_arrays(cp):
    from cm3rt._ext import _C

    rng = cp.random.default_rng(0)
    x = rng.standard_normal((4, 96), dtype=cp.float32)
    w = rng.standard_normal((24, 96), dtype=cp.float32)
    out = cp.full((4, 24), cp.nan, dtype=cp.float32)
    stream = cp.cuda.get_current_stream()
    _C.linear(x, w, None, out, stream.ptr)
    stream.synchronize()
    want = torch.from_dlpack(x) @ torch.from_dlpack(w).T
    torch.testing.assert_close(torch.from_dlpack(out), want, rtol=1e-5, atol=1e-4)

    cb = rng.standard_normal((50, 16), dtype=cp.float32)
    idx = cp.asarray([3, 0, 49, 7], dtype=cp.int64)
    emb = cp.zeros((4, 16), dtype=cp.float32)
    _C.vq_embed(idx, cb, emb, True, stream.ptr)
    stream.synchronize()
    assert bool(cp.all(emb == cb[idx]))


def test_cupy_and_torch_arguments_are_one_device(cp):
    """A cupy array and a torch tensor on the same GPU mix in one call."""
    from cm3rt._ext import _C

    x = cp.ones((2, 8), dtype=cp.float32)
    w = torch.ones(3, 8, device="cuda")
    out = torch.empty(2, 3, device="cuda")
    _C.linear(x, w, None, out, 0)
    torch.cuda.synchronize()
    assert torch.equal(out, torch.full((2, 3), 8.0, device="cuda"))
