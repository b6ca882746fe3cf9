"""ops.linear (the weight-streaming few-row linear) against a float64 reference; int8
weight-only quantisation; the model with bfloat16 / int8 weights."""

from __future__ import annotations

import pytest
import torch

from cm3rt import devices, ops

SHAPES = [(1, 1, 1), (1, 7, 9), (2, 97, 1025), (7, 33, 100), (9, 13, 1100), (64, 5, 257),
          (65, 9, 31)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _reference(x, w, scales=None):
    wd = w.double() if scales is None else w.double() * scales.double()[:, None]
    return x.double() @ wd.T


def _check_against_float64(device, M, N, K, x_dtype, w_dtype, packed=False):
    g = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    x = torch.randn(M, K, generator=g).to(x_dtype).to(device)
    w = torch.randn(N, K, generator=g)
    scales = None
    if w_dtype == torch.int8:
        w, scales = ops.quantize_int8(w)
        scales = scales.to(device)
    w = w.to(w_dtype).to(device)
    out = torch.full((M, N), float("nan"), dtype=x_dtype, device=device)  # poisoned
    if packed:
        ops.linear_packed(x, ops.linear_pack(w), N, scales, out=out)
    else:
        ops.linear(x, w, scales, out=out)
    ref = _reference(x.cpu(), w.cpu(), None if scales is None else scales.cpu())
    err = (out.cpu().double() - ref).abs().max().item()
    scale = ref.abs().max().item() + 1.0
    assert err <= TOL[x_dtype] * scale * (K ** 0.5), (err, scale)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_linear_matches_float64(device, M, N, K, x_dtype, w_dtype):
    _check_against_float64(device, M, N, K, x_dtype, w_dtype)


# Every CPU kernel the machine has (the best one serves the test above): odd shapes, plus
# whole AMX tiles (16 channels) with an odd tile count, and more than 16 rows.
@pytest.mark.parametrize("kernel", ["amx", "avx512", "avx2", "portable"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("M,N,K", SHAPES + [(8, 48, 1024), (17, 64, 64), (3, 16, 2816)])
def test_each_cpu_kernel_matches_float64(kernel, M, N, K, x_dtype, w_dtype):
    if kernel not in ops.linear_cpu_kernels():
        pytest.skip(f"this machine's CPU linear kernels are {ops.linear_cpu_kernels()}")
    with ops.linear_cpu_kernel(kernel):
        _check_against_float64("cpu", M, N, K, x_dtype, w_dtype)


# Packed weights (panels of 16 channels): N not a multiple of 16, odd K (bf16 / int8 pair a
# zero past K), row counts that take every tile height (AVX-512: 8, 4, 2, 1; AVX2: 1 to 6)
# and more than 64 rows.
PACKED_SHAPES = SHAPES + [(8, 48, 1024), (15, 17, 3), (3, 2816 // 8, 1024), (70, 33, 257),
                          (8, 32, 600)]


@pytest.mark.parametrize("kernel", ["avx512", "avx2", "portable"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("M,N,K", PACKED_SHAPES)
def test_packed_weights_match_float64(kernel, M, N, K, x_dtype, w_dtype):
    if kernel not in ops.linear_cpu_kernels():
        pytest.skip(f"this machine's CPU linear kernels are {ops.linear_cpu_kernels()}")
    with ops.linear_cpu_kernel(kernel):
        _check_against_float64("cpu", M, N, K, x_dtype, w_dtype, packed=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_linear_pack_layout(dtype):
    w = (torch.arange(21 * 5).view(21, 5) % 100 - 50).to(dtype)
    packed = ops.linear_pack(w)
    g = 1 if dtype == torch.float32 else 2
    assert packed.shape == (2, -(-5 // g), 16 * g) and packed.dtype == dtype
    for n in range(32):
        for k in range(packed.shape[1] * g):
            want = w[n, k] if n < 21 and k < 5 else 0
            assert packed[n // 16, k // g, (n % 16) * g + k % g] == want, (n, k)


@pytest.mark.parametrize("kernel", ["amx", "avx512", "avx2", "portable"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("packed", [False, True], ids=["nk", "packed"])
def test_non_finite_x_rows_give_non_finite_outputs_and_spare_the_others(kernel, x_dtype,
                                                                        w_dtype, packed):
    """A NaN or infinity in a row of x makes that row's outputs non-finite, as fp32 math
    would, and leaves the other rows right (the int8 kernels that quantise x per row, to
    int16 or int8 digits, must not turn it into numbers)."""
    if kernel not in ops.linear_cpu_kernels():
        pytest.skip(f"this machine's CPU linear kernels are {ops.linear_cpu_kernels()}")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 200, generator=g)
    x[1, 3], x[3, 150] = float("nan"), float("inf")
    x = x.to(x_dtype)
    w = torch.randn(40, 200, generator=g)
    scales = None
    if w_dtype == torch.int8:
        w, scales = ops.quantize_int8(w)
    w = w.to(w_dtype)
    with ops.linear_cpu_kernel(kernel):
        if packed:
            out = ops.linear_packed(x, ops.linear_pack(w), 40, scales).double()
        else:
            out = ops.linear(x, w, scales).double()
    assert not out[1].isfinite().any() and not out[3].isfinite().any()
    ok = [0, 2, 4]
    ref = _reference(x[ok], w, scales)
    assert (out[ok] - ref).abs().max().item() <= TOL[x_dtype] * (ref.abs().max().item() + 1) * 200 ** 0.5


def test_linear_cpu_kernel_names():
    kernels = ops.linear_cpu_kernels()
    assert kernels[-1] == "portable" and set(kernels) <= {"amx", "avx512", "avx2", "portable"}
    assert ops.build_info()["linear_cpu_kernels"] == kernels
    with pytest.raises(ValueError, match="no CPU kernel 'avx9000'.*portable"), \
            ops.linear_cpu_kernel("avx9000"):
        pass
    x, w = torch.randn(2, 40), torch.randn(3, 40)
    with ops.linear_cpu_kernel("portable"):
        got = ops.linear(x, w)
    torch.testing.assert_close(got, ops.linear(x, w))  # the best kernel is back


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_rows_and_output_view(device, dtype):
    # bf16: 3 rows with bf16 weights take the widened-x and widened-weight paths
    x = torch.randn(6, 40, device=device).to(dtype)[::2]  # row stride 80
    w = torch.randn(12, 40, device=device).to(dtype)
    out = torch.zeros(3, 24, device=device, dtype=dtype)[:, :12]  # a view of a wider buffer
    ops.linear(x, w, out=out)
    want = (x.double() @ w.double().T).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)


def test_quantize_int8_round_trip():
    w = torch.randn(16, 64)
    w[3] = 0.0
    q, s = ops.quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (16,) and s[3] == 1.0
    assert int(q.abs().max()) == 127
    assert (q.float() * s[:, None] - w).abs().max() <= s.max() / 2 + 1e-6


def test_linear_rejects_bad_arguments():
    x, w = torch.randn(2, 8), torch.randn(3, 8)
    q, s = ops.quantize_int8(w)
    with pytest.raises(ValueError, match="'scales' is required"):
        ops.linear(x, q)
    with pytest.raises(ValueError, match="'scales' goes with int8"):
        ops.linear(x, w, s)
    with pytest.raises(ValueError, match="weight"):
        ops.linear(x, torch.randn(3, 9))
    with pytest.raises(TypeError, match="'x'"):
        ops.linear(x.double(), w)
    with pytest.raises(ValueError, match="scales"):
        ops.linear(x, q, s[:2])
    with pytest.raises(ValueError, match="2-D"):
        ops.linear(x[0], w)
    with pytest.raises(ValueError, match="'out'"):
        ops.linear(x, w, out=torch.empty(2, 4))


def test_linear_packed_rejects_bad_arguments():
    x, w = torch.randn(2, 8), torch.randn(3, 8)
    q, s = ops.quantize_int8(w)
    pw, pq = ops.linear_pack(w), ops.linear_pack(q)
    with pytest.raises(ValueError, match="'scales' is required"):
        ops.linear_packed(x, pq, 3)
    with pytest.raises(ValueError, match="'scales' goes with int8"):
        ops.linear_packed(x, pw, 3, s)
    with pytest.raises(ValueError, match="linear_pack"):  # K of x does not match
        ops.linear_packed(torch.randn(2, 9), pw, 3)
    with pytest.raises(ValueError, match="linear_pack"):  # n past the panels
        ops.linear_packed(x, pw, 17)
    with pytest.raises(ValueError, match="linear_pack"):  # an [N, K] weight
        ops.linear_packed(x, w, 3)
    with pytest.raises(ValueError, match="'packed'.*contiguous"):
        ops.linear_packed(x, torch.zeros(1, 16, 8).transpose(1, 2), 3)
    with pytest.raises(ValueError, match="out of range"):
        ops.linear_packed(x, pw, -1)
    with pytest.raises(ValueError, match="'out'"):
        ops.linear_packed(x, pw, 3, out=torch.empty(2, 4))
    with pytest.raises(ValueError, match="linear_pack: argument 'weight'"):
        ops.linear_pack(torch.randn(3, 8).double())
    out = ops.linear_packed(torch.randn(0, 8), pw, 3)  # no rows: nothing to do
    assert out.shape == (0, 3)


def test_int8_activations_are_bf16_where_the_cpu_multiplies_bf16(monkeypatch):
    # An fp32 KV cache would be ~40% of an int8 decode step's bytes (bench_engine's model).
    assert devices.resolve_weight_dtype("int8", "cpu") == (devices.int8_activation_dtype(),
                                                            True)
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert devices.resolve_weight_dtype("INT8", "cpu") == (torch.bfloat16, True)
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert devices.resolve_weight_dtype("int8", "cpu") == (torch.float32, True)
    assert devices.int8_activation_dtype("cuda") == torch.bfloat16


def test_model_with_int8_and_bf16_weights_tracks_fp32(tmp_path):
    from model_fixtures import make_tiny_model_dir

    from cm3rt.model import load_model

    path = make_tiny_model_dir(tmp_path, use_hf=False, seed=4)
    ids = torch.randint(0, 200, (2, 11))
    ref = load_model(path).logits(ids)
    int8 = load_model(path, dtype="int8")
    assert int8.weights_int8 and int8.layers[0].qkv_proj.dtype == torch.int8
    assert int8.dtype == devices.int8_activation_dtype("cpu")  # activations and KV cache
    assert int8.layers[0].qkv_proj_scales.dtype == torch.float32
    head = int8.lm_head_rows(torch.arange(10, 20))  # the image-span head is int8 as well
    assert head.weight.dtype == torch.int8 and head.scales.shape == (10,)
    got = int8.logits(ids)
    rel = (got - ref).norm() / ref.norm()
    assert rel < 0.03, rel  # weight-only int8 per channel: ~1% of the logits' norm
    bf16 = load_model(path, dtype="bfloat16").logits(ids)
    assert (bf16.float() - ref).norm() / ref.norm() < 0.03
    with pytest.raises(ValueError, match="int8"):
        load_model(path, dtype="int4")


def _real_bytes(model) -> int:
    """Bytes the model's tensors hold (meta stand-ins hold none)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if t is not None}
    return sum(t.numel() * t.element_size() for t in tensors.values() if not t.is_meta)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_load_model_packs_by_default_where_the_cpu_runs_panels(tmp_path, dtype):
    """On the CPU load_model packs the projections (and the image-span heads) where
    packs_weights says, in place of the [N, K] weights (a meta stand-in keeps the shape,
    the memory stays the same); the packed model's logits are the [N, K] model's up to
    summation order; pack_weights=False keeps [N, K]."""
    from model_fixtures import make_tiny_model_dir

    from cm3rt.model import load_model
    from cm3rt.model.chameleon import PROJECTIONS, packs_weights

    path = make_tiny_model_dir(tmp_path, use_hf=False, seed=5)
    plain = load_model(path, dtype=dtype, pack_weights=False)
    assert not plain.weights_packed
    model = load_model(path, dtype=dtype)
    layer, plain_layer = model.layers[0], plain.layers[0]
    want = packs_weights(model.dtype, plain_layer.qkv_proj.dtype)
    assert model.weights_packed == want
    for name in PROJECTIONS:
        packed, weight = getattr(layer, f"{name}_packed"), getattr(layer, name)
        assert (packed is not None) == want and weight.is_meta == want
        assert weight.shape == getattr(plain_layer, name).shape
        if want:
            assert torch.equal(packed, ops.linear_pack(getattr(plain_layer, name)))
            assert torch.equal(ops.linear_unpack(packed, *weight.shape),
                               getattr(plain_layer, name))
    head = model.lm_head_rows(torch.arange(10, 30))
    assert (head.packed is not None) == want and head.weight.is_meta == want
    # Panels pad N and K to whole panels / pairs: the tiny model's 20-row heads and odd
    # shapes cost a little; nothing near a second copy.
    assert _real_bytes(model) < 1.15 * _real_bytes(plain)
    ids = torch.randint(0, 200, (2, 11), generator=torch.Generator().manual_seed(0))
    got, ref = model.logits(ids), plain.logits(ids)
    tol = 1e-4 if dtype == "float32" else 2e-2
    assert (got - ref).norm() / ref.norm() < tol


def test_quantizing_a_packed_model_reads_its_panels(tmp_path):
    """quantize_int8_ on a model whose projections live only in panels quantises the
    panels' values: the same int8 weights as quantising the [N, K] model."""
    from model_fixtures import make_tiny_model_dir

    from cm3rt.model import load_model
    from cm3rt.model.chameleon import PROJECTIONS

    path = make_tiny_model_dir(tmp_path, use_hf=False, seed=6)
    packed = load_model(path, dtype="float32").quantize_int8_()
    plain = load_model(path, dtype="float32", pack_weights=False).quantize_int8_()
    for a, b in zip(packed.layers, plain.layers):
        for name in PROJECTIONS:
            assert torch.equal(getattr(a, f"{name}_scales"), getattr(b, f"{name}_scales"))
            weight = getattr(a, name)
            if getattr(a, f"{name}_packed") is not None:
                weight = ops.linear_unpack(getattr(a, f"{name}_packed"), *weight.shape)
            assert torch.equal(weight, getattr(b, name))


def test_linear_unpack_rejects_a_mismatched_shape():
    packed = ops.linear_pack(torch.randn(20, 7))
    with pytest.raises(ValueError, match=r"not the panels of a \[40, 7\]"):
        ops.linear_unpack(packed, 40, 7)
