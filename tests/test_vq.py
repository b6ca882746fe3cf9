"""vq_nearest and vq_embed against float64 references, on every device present."""

from __future__ import annotations

import pytest
import torch
from device_kinds import cuda_kernels, emulated

from cm3rt import ops


def dtypes_for(device):
    return [torch.float32] + ([torch.bfloat16, torch.float16] if cuda_kernels(device) else [])


def reference_check(z: torch.Tensor, cb: torch.Tensor, got: torch.Tensor, min_exact: float):
    """The chosen code's float64 distance is within float32 rounding of the true minimum, and
    almost every row picks exactly the float64 argmin."""
    z64, cb64 = z.double().cpu(), cb.double().cpu()
    d = ((z64[:, None, :] - cb64[None, :, :]) ** 2).sum(-1)  # [N, K], small sizes only
    best, ref = d.min(1)
    got = got.cpu()
    assert got.dtype == torch.int64 and got.shape == (z.shape[0],)
    assert bool(((got >= 0) & (got < cb.shape[0])).all())
    chosen = d.gather(1, got[:, None])[:, 0]
    # fp32 scores ||e||^2 - 2 z.e: rounding error ~ eps * (||z||^2 + ||e||^2) * a few
    scale = (z64 ** 2).sum(1) + (cb64 ** 2).sum(1).max()
    assert bool((chosen - best <= 4e-6 * scale + 1e-9).all()), float((chosen - best).max())
    assert (got == ref).double().mean().item() >= min_exact


@pytest.mark.parametrize("N", [1, 7, 1025])
@pytest.mark.parametrize("K,C", [(512, 64), (1001, 13), (37, 256)])
def test_vq_nearest_matches_reference(device, N, K, C):
    gen = torch.Generator().manual_seed(N * 1000 + K + C)
    if emulated(device) and N > 200:
        N = 200  # still several 64-row tiles and a partial one, at a fifth of the cost
    for dtype in dtypes_for(device):
        z = torch.randn(N, C, generator=gen).to(dtype)
        cb = torch.randn(K, C, generator=gen).to(dtype)
        out = torch.full((N,), -7, dtype=torch.int64, device=device)  # poisoned
        got = ops.vq_nearest(z.to(device), cb.to(device), out=out)
        assert got.data_ptr() == out.data_ptr()
        reference_check(z.float(), cb.float(), got, min_exact=0.99)


def test_vq_nearest_near_codes_exact(device):
    # z = code + small noise: the right code is far ahead, so the match must be exact
    gen = torch.Generator().manual_seed(3)
    K, C, N = (1024, 256, 64) if emulated(device) else (4096, 256, 300)
    cb = torch.randn(K, C, generator=gen)
    want = torch.randint(0, K, (N,), generator=gen)
    z = cb[want] + 0.01 * torch.randn(N, C, generator=gen)
    for dtype in dtypes_for(device):
        got = ops.vq_nearest(z.to(dtype).to(device), cb.to(dtype).to(device))
        assert torch.equal(got.cpu(), want)


def test_vq_nearest_ties_go_to_the_lowest_index(device):
    gen = torch.Generator().manual_seed(4)
    K, C = 64, 24
    cb = torch.randn(K, C, generator=gen)
    cb[17] = cb[5]
    cb[40] = cb[5]
    cb[63] = cb[9]
    z = torch.stack([cb[5] + 0.001, cb[40], cb[63], cb[9] * 1.0001])
    got = ops.vq_nearest(z.to(device), cb.to(device))
    assert got.tolist() == [5, 5, 9, 9]


def test_vq_nearest_sqnorm_and_strides(device):
    gen = torch.Generator().manual_seed(5)
    K, C, N = 300, 40, 50
    cb = torch.randn(K, C, generator=gen).to(device)
    big = torch.randn(N, C + 9, generator=gen).to(device)
    z = big[:, 3:3 + C]  # rows with a stride of C + 9
    a = ops.vq_nearest(z, cb)
    b = ops.vq_nearest(z, cb, (cb.double() ** 2).sum(1).float())
    c = ops.vq_nearest(z.contiguous(), cb)
    assert torch.equal(a, c)
    reference_check(z.cpu(), cb.cpu(), a, min_exact=0.98)
    reference_check(z.cpu(), cb.cpu(), b, min_exact=0.98)


def test_vq_nearest_nonfinite_rows(device):
    cb = torch.randn(10, 8, device=device)
    z = torch.randn(3, 8, device=device)
    z[1, 2] = float("nan")
    z[2, 0] = float("inf")
    got = ops.vq_nearest(z, cb)
    assert got[1].item() == -1 and got[2].item() == -1 and 0 <= got[0].item() < 10


def test_vq_nearest_bad_arguments(device):
    cb = torch.randn(10, 8, device=device)
    with pytest.raises(ValueError, match="'z'"):
        ops.vq_nearest(torch.randn(8, device=device), cb)
    with pytest.raises(ValueError, match="'z'"):
        ops.vq_nearest(torch.randn(3, 7, device=device), cb)
    with pytest.raises(TypeError, match="same dtype"):
        ops.vq_nearest(torch.randn(3, 8, device=device), cb.double())
    with pytest.raises(ValueError, match="codebook_sqnorm"):
        ops.vq_nearest(torch.randn(3, 8, device=device), cb, torch.ones(9, device=device))
    with pytest.raises(ValueError, match="K >= 1"):
        ops.vq_nearest(torch.randn(3, 8, device=device), torch.randn(0, 8, device=device))
    with pytest.raises(TypeError, match="'z'"):
        ops.vq_nearest([[1.0] * 8], cb)
    if not cuda_kernels(device):
        with pytest.raises(TypeError, match="float32"):
            ops.vq_nearest(torch.randn(3, 8).bfloat16(), cb.bfloat16())


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shape", [(1,), (7,), (2, 3, 5)])
def test_vq_embed_gathers_exactly(device, idx_dtype, shape):
    gen = torch.Generator().manual_seed(6)
    for dtype in (torch.float32, torch.bfloat16):
        for C in (256, 13):
            cb = torch.randn(100, C, generator=gen).to(dtype).to(device)
            idx = torch.randint(0, 100, shape, generator=gen).to(idx_dtype).to(device)
            out = ops.vq_embed(idx, cb)
            assert out.shape == (*shape, C) and out.dtype == dtype
            assert torch.equal(out, cb[idx.long()])


def test_vq_embed_roundtrip_with_nearest(device):
    gen = torch.Generator().manual_seed(7)
    cb = torch.randn(256, 32, generator=gen).to(device)
    idx = torch.randint(0, 256, (500,), generator=gen).to(device)
    assert torch.equal(ops.vq_nearest(ops.vq_embed(idx, cb), cb), idx)


def test_vq_embed_bad_indices(device):
    cb = torch.randn(10, 4, device=device)
    for bad in (10, -1):
        idx = torch.tensor([0, bad, 3], device=device)
        with pytest.raises(ValueError, match=r"'idx' \(flattened\)\[1\]"):
            ops.vq_embed(idx, cb, validate=True)
    with pytest.raises(TypeError, match="idx"):
        ops.vq_embed(torch.zeros(3, device=device), cb)
    if cuda_kernels(device):  # unchecked: an out-of-range index gives a zero row, nothing else
        out = ops.vq_embed(torch.tensor([1, 99, 2], device=device), cb)
        assert torch.equal(out[1], torch.zeros(4, device=device))
        assert torch.equal(out[0], cb[1]) and torch.equal(out[2], cb[2])
