"""The fused CPU layer ops (ops.rms_norm / qk_norm_rope / swiglu) against the torch
reference of cm3rt.model.layers: half precision bit for bit, float32 to a few ulps (the
summation order differs), vector and scalar tails, and bad arguments."""

from __future__ import annotations

import pytest
import torch

from cm3rt import ops
from cm3rt.model import layers

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    if want.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    else:  # the same rounding points: equal, but for a rare 1-ulp tie from fp32 sums
        diff = (got.float() - want.float()).abs()
        ulp = want.float().abs().clamp_min(1e-3) * (2 ** -7 if want.dtype == torch.bfloat16
                                                    else 2 ** -10)
        assert (diff <= ulp).all() and (diff > 0).float().mean() <= 0.01, diff.max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H", [(1, 8), (5, 100), (8, 1024)])
def test_rms_norm_matches_reference(dtype, T, H):
    g = torch.Generator().manual_seed(T * H)
    x = (3 * torch.randn(T, H, generator=g)).to(dtype)
    w = (1 + 0.2 * torch.randn(H, generator=g)).to(dtype)
    _close(ops.rms_norm(x, w, 1e-5), layers.rms_norm(x, w, 1e-5))
    residual = torch.randn(T, H, generator=g).to(dtype)
    want_sum = residual + x
    got = ops.rms_norm(x, w, 1e-5, residual=residual)
    assert torch.equal(residual, want_sum)  # residual += x, rounded as torch's add
    _close(got, layers.rms_norm(want_sum, w, 1e-5))
    # rows of a wider buffer (a strided x)
    wide = torch.randn(T, H + 8, generator=g).to(dtype)
    _close(ops.rms_norm(wide[:, :H], w, 1e-5), layers.rms_norm(wide[:, :H], w, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,Hq,Hkv,D", [(1, 1, 1, 6), (7, 4, 2, 64), (3, 2, 2, 128)])
def test_qk_norm_rope_matches_reference(dtype, T, Hq, Hkv, D):
    g = torch.Generator().manual_seed(T + Hq + D)
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=g).to(dtype)
    qw, qb = (1 + 0.1 * torch.randn(Hq, D, generator=g)).to(dtype), \
        (0.1 * torch.randn(Hq, D, generator=g)).to(dtype)
    kw, kb = (1 + 0.1 * torch.randn(Hkv, D, generator=g)).to(dtype), \
        (0.1 * torch.randn(Hkv, D, generator=g)).to(dtype)
    positions = torch.randint(0, 4096, (T,), generator=g)
    inv_freq = layers.rope_inv_freq(D, 10000.0)
    cos, sin = layers.rope_cos_sin(positions, inv_freq)
    q = qkv[:, :Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D:(Hq + Hkv) * D].view(T, Hkv, D)
    want_q = layers.apply_rope(layers.qk_layer_norm(q, qw, qb, 1e-5), cos, sin)
    want_k = layers.apply_rope(layers.qk_layer_norm(k, kw, kb, 1e-5), cos, sin)
    got = qkv.clone()
    assert ops.qk_norm_rope(got, qw, qb, kw, kb, positions, inv_freq, 1e-5) is got
    # cos / sin of large angles differ by an ulp between libm and torch (float32: a few ulps)
    tol = {"rtol": 2e-5, "atol": 2e-5} if dtype == torch.float32 else None
    for have, want in ((got[:, :Hq * D].view(T, Hq, D), want_q),
                       (got[:, Hq * D:(Hq + Hkv) * D].view(T, Hkv, D), want_k)):
        if tol:
            torch.testing.assert_close(have, want, **tol)
        else:
            _close(have, want)
    assert torch.equal(got[:, (Hq + Hkv) * D:], qkv[:, (Hq + Hkv) * D:])  # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,I", [(1, 3), (8, 2816), (5, 20)])
def test_swiglu_matches_reference(dtype, T, I):
    g = torch.Generator().manual_seed(T * I)
    gate_up = (4 * torch.randn(T, 2 * I, generator=g)).to(dtype)
    gate_up[0, 0] = -100.0  # e^-|g| underflows: silu -> -0
    _close(ops.swiglu(gate_up), layers.swiglu(gate_up))


def test_layer_ops_reject_bad_arguments():
    x, w = torch.randn(4, 16), torch.randn(16)
    with pytest.raises(TypeError, match="'x' must be a torch.Tensor"):
        ops.rms_norm([1.0], w, 1e-5)
    with pytest.raises(TypeError, match="'gate_up' must be a torch.Tensor"):
        ops.swiglu("x")
    with pytest.raises(TypeError, match="'positions' must be a torch.Tensor"):
        ops.qk_norm_rope(torch.randn(3, 48), w, w, w, w, [0, 1, 2], torch.ones(4), 1e-5)
    with pytest.raises(ValueError, match="'weight'"):
        ops.rms_norm(x, torch.randn(8), 1e-5)
    with pytest.raises(TypeError, match="'weight'"):
        ops.rms_norm(x, w.double(), 1e-5)
    with pytest.raises(ValueError, match="'residual'"):
        ops.rms_norm(x, w, 1e-5, residual=torch.randn(4, 8))
    with pytest.raises(ValueError, match="even last dim"):
        ops.swiglu(torch.randn(2, 7))
    qw = torch.ones(2, 8)
    with pytest.raises(ValueError, match=r"\(Hq \+ 2 Hkv\) \* D"):
        ops.qk_norm_rope(torch.randn(3, 40), qw, qw, qw, qw, torch.zeros(3, dtype=torch.int64),
                         torch.ones(4), 1e-5)
    with pytest.raises(TypeError, match="'positions'"):
        ops.qk_norm_rope(torch.randn(3, 48), qw, qw, qw, qw, torch.zeros(3), torch.ones(4), 1e-5)
    with pytest.raises(ValueError, match="'inv_freq'"):
        ops.qk_norm_rope(torch.randn(3, 48), qw, qw, qw, qw, torch.zeros(3, dtype=torch.int64),
                         torch.ones(3), 1e-5)
