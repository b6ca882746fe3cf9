"""sample_logits: distribution (chi-square against a float64 reference), determinism, batch
layout invariance, flagged groups and argument errors, on every device present.

False alarms: each distribution test passes when the chi-square p-value exceeds ALPHA = 1e-4,
so with a correct kernel a fresh seed fails a given test with probability 1e-4 (~1e-3 for the
whole file). Seeds are fixed, so a run is reproducible. test_chi_square_has_power shows the same
check rejects slightly wrong distributions at these sample sizes.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from device_kinds import emulated
from sampling_reference import GroupSpec, chi_square_pvalue, final_distribution

from cm3rt import ops
from cm3rt._ext import _C

ALPHA = 1e-4
N_DRAWS = 20000
# Under the emulator a draw costs milliseconds: fewer draws, each also compared token for
# token with the CPU kernel (the same group, seed and step give the same token on every
# device), which checks far more than the chi-square can at any sample size.
N_DRAWS_EMULATED = 300


def n_draws(device) -> int:
    return N_DRAWS_EMULATED if emulated(device) else N_DRAWS
STREAMS = {"none": 1, "cfg": 2, "cdk": 2, "cfg3": 3}


def make_rows(V: int, S: int, seed: int, scale: float = 1.5, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(S, V, generator=gen, dtype=torch.float64) * scale
    return rows.to(dtype)


def spec_kwargs(spec: GroupSpec) -> dict:
    return {"mode": spec.mode, "temperature": spec.temperature, "top_k": spec.top_k,
            "top_p": spec.top_p, "cfg_scale": spec.cfg_scale,
            "cfg_image_scale": spec.cfg_image_scale, "cd_alpha": spec.cd_alpha,
            "cd_k": spec.cd_k}


def case_seed(name: str) -> int:
    """A Philox seed per test case: with one shared seed every test would see the same uniform
    sequence (the draw is an inverse CDF), so one unlucky sequence would fail them all."""
    return zlib.crc32(name.encode())


def draw_many(rows: torch.Tensor, spec: GroupSpec, device: str, n: int | None = None,
              seed: int = 1234, allowed=None, allowed_bits=None):
    """n draws of one group: the group repeated n times in one call, step = 0..n-1."""
    n = n_draws(device) if n is None else n
    S = rows.shape[0]
    logits = rows.to(device).repeat(n, 1)  # [n*S, V], groups adjacent
    steps = torch.arange(n, dtype=torch.int64, device=device)
    tokens, logprobs = ops.sample_logits(
        logits, S, seed=seed, step=steps, allowed=allowed, allowed_bits=allowed_bits,
        validate=True, **spec_kwargs(spec))
    if emulated(device):
        with ops.emulated(False):  # the CPU kernel, same arguments
            cpu_t, cpu_lp = ops.sample_logits(
                logits, S, seed=seed, step=steps, allowed=allowed, allowed_bits=allowed_bits,
                validate=True, **spec_kwargs(spec))
        assert torch.equal(tokens, cpu_t)
        torch.testing.assert_close(logprobs, cpu_lp, atol=1e-5, rtol=1e-5)
    return tokens.cpu().numpy(), logprobs.cpu().numpy()


def check_distribution(rows: torch.Tensor, spec: GroupSpec, device: str, allowed_np=None,
                       **kw):
    tokens, logprobs = draw_many(rows, spec, device, **kw)
    ref = final_distribution([r.double().numpy() for r in rows.float()], spec, allowed_np)
    assert ref is not None
    V = rows.shape[1]
    assert tokens.min() >= 0 and tokens.max() < V
    counts = np.bincount(tokens, minlength=V)
    p = chi_square_pvalue(counts, ref)
    assert p > ALPHA, f"chi-square p = {p:.2e}; counts {counts.tolist()} vs {np.round(ref, 4)}"
    # logprob of each drawn token under the final distribution
    np.testing.assert_allclose(logprobs, np.log(ref[tokens]), atol=2e-4, rtol=1e-4)
    return counts, ref


# ---- shared math --------------------------------------------------------------------------------

def test_philox_known_answers():
    # Random123's kat_vectors for philox4x32-10: counter[4], key[2] -> output[4]
    kat = [
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
         [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
    ]
    for ctr, key, want in kat:
        assert list(_C._philox4x32_10(ctr, key)) == want


def test_deterministic_exp_log_accuracy():
    x = np.concatenate([-np.logspace(-8, np.log10(87), 4000), [0.0, -1e-30]]).astype(np.float32)
    got = np.array(_C._exp_nonpos(x.tolist()), dtype=np.float64)
    ref = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - ref) / ref) < 4e-7
    assert _C._exp_nonpos([-88.0, -math.inf])[0] == 0.0
    y = np.concatenate([np.logspace(-40, 38, 4000), [1.0, 1e-45]]).astype(np.float32)
    got = np.array(_C._log_pos(y.tolist()), dtype=np.float64)
    ref = np.log(y.astype(np.float64))
    assert np.max(np.abs(got - ref) / np.maximum(np.abs(ref), 1.0)) < 4e-7
    assert _C._log_pos([0.0])[0] == -math.inf


def test_weight_fixed_forms_agree():
    # floor(w * 2^40), once through int64 and once from two exact 20-bit halves (vector loops)
    gen = np.random.default_rng(0)
    w = np.concatenate([gen.random(20000), np.exp(-gen.random(20000) * 40), [0.0, 1.0, 2**-40,
                        2**-41, 1 - 2**-24, 2**-20, 3 * 2**-21]]).astype(np.float32)
    got = np.array(_C._weight_fixed(w.tolist()), dtype=np.uint64)
    want = np.floor(w.astype(np.float64) * 2.0**40).astype(np.uint64)
    assert np.array_equal(got[:, 0], want) and np.array_equal(got[:, 1], want)


# ---- distributions, each step in isolation and combined ----------------------------------------

CASES = [
    ("plain", GroupSpec()),
    ("temperature", GroupSpec(temperature=0.6)),
    ("hot", GroupSpec(temperature=2.5)),
    ("top_k", GroupSpec(top_k=3)),
    ("top_p", GroupSpec(top_p=0.7)),
    ("top_p_small", GroupSpec(top_p=0.05)),
    ("cfg", GroupSpec(mode="cfg", cfg_scale=3.0)),
    ("cfg_negative", GroupSpec(mode="cfg", cfg_scale=-0.5)),
    ("cfg3", GroupSpec(mode="cfg3", cfg_scale=2.5, cfg_image_scale=1.5)),
    ("cdk", GroupSpec(mode="cdk", cd_alpha=0.1, cd_k=1)),
    ("cdk_k3", GroupSpec(mode="cdk", cd_alpha=0.3, cd_k=3)),
    ("cdk_alpha0", GroupSpec(mode="cdk", cd_alpha=0.0, cd_k=2)),
    ("combined_cfg", GroupSpec(mode="cfg", cfg_scale=2.0, temperature=0.8, top_k=6, top_p=0.8)),
    ("combined_cfg3", GroupSpec(mode="cfg3", cfg_scale=1.5, cfg_image_scale=2.0, top_p=0.9,
                                temperature=1.3)),
    ("combined_cdk", GroupSpec(mode="cdk", cd_alpha=0.05, cd_k=2, top_k=4, top_p=0.95,
                               temperature=0.9)),
]


@pytest.mark.parametrize("name,spec", CASES, ids=[c[0] for c in CASES])
def test_distribution(device, name, spec):
    # V = 37: several full vector iterations of the CPU loops plus a tail
    rows = make_rows(37, STREAMS[spec.mode], seed=len(name) * 31 + 7)
    check_distribution(rows, spec, device, seed=case_seed(name))


@pytest.mark.parametrize("kind", ["bool_shared", "bool_per_group", "bits"])
@pytest.mark.parametrize("V", [40, 301])
def test_distribution_masked(device, kind, V):
    # V = 40: two bit words, the second partial; V = 301: several full vector iterations of the
    # CPU's mask loads (a miscompiled mask reduction once showed only from V = 64 on)
    spec = GroupSpec(mode="cfg", cfg_scale=2.0, top_p=0.9)
    rows = make_rows(V, 2, seed=5 + V)
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[[0, 3, 5, 9, 17, 31, 32, 38, 39]] = True
    if V > 40:
        allowed[torch.randperm(V, generator=torch.Generator().manual_seed(V))[:40]] = True
    kw = {}
    if kind == "bool_shared":
        kw["allowed"] = allowed.to(device)
    elif kind == "bool_per_group":
        kw["allowed"] = allowed.to(device).repeat(n_draws(device), 1)
    else:
        kw["allowed_bits"] = ops.pack_allowed_bits(allowed).to(device)
    counts, _ = check_distribution(rows, spec, device, allowed_np=allowed.numpy(),
                                   seed=case_seed(f"{kind}{V}"), **kw)
    assert counts[~allowed.numpy()].sum() == 0


def test_bool_and_bit_masks_agree(device):
    G, V = 64, 77
    gen = torch.Generator().manual_seed(13)
    logits = torch.randn(2 * G, V, generator=gen).to(device)
    allowed = (torch.rand(G, V, generator=gen) < 0.3).to(device)
    bits = ops.pack_allowed_bits(allowed)
    assert bits.shape == (G, 3) and bits.dtype == torch.int32
    kw = {"mode": "cfg", "cfg_scale": 2.0, "top_k": 5, "seed": 3,
          "step": torch.arange(G, device=device)}
    a, la = ops.sample_logits(logits, 2, allowed=allowed, **kw)
    b, lb = ops.sample_logits(logits, 2, allowed_bits=bits, **kw)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert bool(allowed.gather(1, a[:, None].clamp_min(0))[:, 0][a >= 0].all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_distribution_half_inputs(device, dtype):
    # the reference sees the rounded 16-bit values the kernel reads
    spec = GroupSpec(mode="cfg", cfg_scale=2.0, top_k=8)
    rows = make_rows(37, 2, seed=11, dtype=dtype)
    check_distribution(rows, spec, device, seed=case_seed(str(dtype)))


def test_chi_square_has_power(device):
    """The check used above rejects near misses at these sample sizes."""
    if emulated(device):
        pytest.skip("the power of the check at N_DRAWS draws; emulated draws are fewer and "
                    "compared token for token with the CPU kernel instead")
    rows = make_rows(12, 1, seed=3)
    tokens, _ = draw_many(rows, GroupSpec(temperature=1.0, top_p=0.9), device)
    counts = np.bincount(tokens, minlength=12)
    base = [rows[0].double().numpy()]
    good = final_distribution(base, GroupSpec(temperature=1.0, top_p=0.9))
    assert chi_square_pvalue(counts, good) > ALPHA
    # temperature off by 20% (10% gives p ~ 6e-5 here: at the edge), top-p off or moved
    for wrong in (GroupSpec(temperature=1.2, top_p=0.9), GroupSpec(temperature=1.0),
                  GroupSpec(temperature=1.0, top_p=0.8)):
        assert chi_square_pvalue(counts, final_distribution(base, wrong)) < ALPHA


def test_top_k_large_vocab_row_split(device):
    # one group over a large vocabulary: the CPU splits the row across threads
    V = 16384
    rows = make_rows(V, 1, seed=21, scale=3.0)
    spec = GroupSpec(top_k=4, temperature=1.5)
    n = 60 if emulated(device) else 1500
    logits = rows.to(device)
    tokens = [int(ops.sample_logits(logits, 1, seed=9, step=s, **spec_kwargs(spec))[0][0])
              for s in range(n)]
    if emulated(device):
        with ops.emulated(False):
            assert tokens == [int(ops.sample_logits(logits, 1, seed=9, step=s,
                                                    **spec_kwargs(spec))[0][0])
                              for s in range(n)]
    ref = final_distribution([rows[0].double().numpy()], spec)
    assert chi_square_pvalue(np.bincount(tokens, minlength=V), ref) > ALPHA


# ---- argmax -------------------------------------------------------------------------------------

def test_temperature_zero_argmax_lowest_id(device):
    V = 50
    c = torch.randn(V)
    c[[7, 23, 41]] = c.max() + 1.0  # a three-way tie for the maximum
    logits = torch.stack([c, torch.randn(V)]).to(device)
    tok, lp = ops.sample_logits(logits[:1], 1, temperature=0.0, seed=0, step=0)
    assert tok.tolist() == [7] and lp.tolist() == [0.0]
    # cfg at T = 0: argmax of the combined logits
    tok, _ = ops.sample_logits(logits, 2, mode="cfg", cfg_scale=3.0, temperature=0.0, seed=0,
                               step=0)
    comb = logits[1].double().cpu() + 3.0 * (logits[0].double().cpu() - logits[1].double().cpu())
    assert tok.item() == int(torch.argmax(comb))
    # top-k / top-p / the seed do not move an argmax
    tok2, _ = ops.sample_logits(logits, 2, mode="cfg", cfg_scale=3.0, temperature=0.0, top_k=2,
                                top_p=0.1, seed=99, step=5)
    assert tok2.item() == tok.item()
    # with a mask, the argmax of the allowed tokens
    allowed = torch.ones(V, dtype=torch.bool, device=device)
    allowed[7] = False
    tok3, _ = ops.sample_logits(logits[:1], 1, temperature=0.0, allowed=allowed, seed=0, step=0)
    assert tok3.item() == 23


# ---- determinism and layout invariance ---------------------------------------------------------

def _mixed_batch(V: int, seed: int, device: str):
    """Groups of every mode with different stream counts and settings."""
    gen = torch.Generator().manual_seed(seed)
    specs = [
        GroupSpec("none", temperature=0.9, top_p=0.9),
        GroupSpec("cfg", cfg_scale=3.0, top_k=50),
        GroupSpec("cfg3", cfg_scale=2.0, cfg_image_scale=1.2, top_p=0.8, top_k=20),
        GroupSpec("cdk", cd_alpha=0.1, cd_k=2, temperature=1.1),
        GroupSpec("none", temperature=0.0),
        GroupSpec("cfg", cfg_scale=1.5, temperature=0.7, top_p=0.95),
    ]
    rows = [torch.randn(STREAMS[s.mode], V, generator=gen) * 2 for s in specs]
    seeds = [11, 22, 33, 44, 55, 66]
    steps = [3, 1, 4, 1, 5, 9]
    return specs, rows, seeds, steps


def _call_batch(specs, rows, seeds, steps, device):
    as_t = lambda xs, dt: torch.tensor(xs, dtype=dt, device=device)
    return ops.sample_logits(
        torch.cat(rows).to(device),
        as_t([r.shape[0] for r in rows], torch.int32),
        mode=[s.mode for s in specs],
        temperature=as_t([s.temperature for s in specs], torch.float32),
        top_k=as_t([s.top_k for s in specs], torch.int32),
        top_p=as_t([s.top_p for s in specs], torch.float32),
        cfg_scale=as_t([s.cfg_scale for s in specs], torch.float32),
        cfg_image_scale=as_t([s.cfg_image_scale for s in specs], torch.float32),
        cd_alpha=as_t([s.cd_alpha for s in specs], torch.float32),
        cd_k=as_t([s.cd_k for s in specs], torch.int32),
        seed=as_t(seeds, torch.int64), step=as_t(steps, torch.int64), validate=True)


@pytest.mark.parametrize("V", [97, 4099])
def test_batch_layout_invariance_and_per_group_params(device, V):
    specs, rows, seeds, steps = _mixed_batch(V, seed=V, device=device)
    tokens, logprobs = _call_batch(specs, rows, seeds, steps, device)
    # each group alone, with scalar settings, gives the same token
    for g, spec in enumerate(specs):
        t, lp = ops.sample_logits(rows[g].to(device), rows[g].shape[0], seed=seeds[g],
                                  step=steps[g], **spec_kwargs(spec))
        assert t.item() == tokens[g].item(), f"group {g} ({spec.mode})"
        torch.testing.assert_close(lp, logprobs[g:g + 1])
    # reversed order, padded with unrelated groups: the same tokens
    extra = [GroupSpec("cfg", cfg_scale=5.0)] * 2
    gen = torch.Generator().manual_seed(1)
    extra_rows = [torch.randn(2, V, generator=gen) for _ in extra]
    order = list(reversed(range(len(specs))))
    t2, _ = _call_batch([extra[0]] + [specs[g] for g in order] + [extra[1]],
                        [extra_rows[0]] + [rows[g] for g in order] + [extra_rows[1]],
                        [7] + [seeds[g] for g in order] + [8],
                        [7] + [steps[g] for g in order] + [8], device)
    assert t2[1:-1].tolist() == [tokens[g].item() for g in order]
    # deterministic: the same call again
    t3, lp3 = _call_batch(specs, rows, seeds, steps, device)
    assert torch.equal(t3, tokens) and torch.equal(lp3, logprobs)
    # the log-probabilities match the reference distribution
    for g, spec in enumerate(specs):
        ref = final_distribution([r.double().numpy() for r in rows[g]], spec)
        want = 0.0 if spec.temperature == 0 else math.log(ref[tokens[g].item()])
        assert abs(logprobs[g].item() - want) < 2e-4


def test_row_split_matches_group_split(device):
    # V = 65536: alone (CPU: split across threads) and in a batch (CPU: one thread per group)
    V = 65536
    gen = torch.Generator().manual_seed(2)
    rows = torch.randn(8, V, generator=gen) * 3
    kw = {"mode": "cfg", "cfg_scale": 3.0, "top_p": 0.9, "top_k": 1000}
    batch, _ = ops.sample_logits(rows.to(device), 2, seed=5, step=torch.arange(
        4, device=device), **kw)
    for g in range(4):
        alone, _ = ops.sample_logits(rows[2 * g:2 * g + 2].to(device), 2, seed=5, step=g, **kw)
        assert alone.item() == batch[g].item()


def test_steps_and_seeds_change_the_draw(device):
    rows = make_rows(1000, 1, seed=4, scale=0.1).to(device)  # near-uniform: draws must differ
    a = [ops.sample_logits(rows, 1, seed=1, step=s)[0].item() for s in range(20)]
    b = [ops.sample_logits(rows, 1, seed=2, step=s)[0].item() for s in range(20)]
    assert len(set(a)) > 10 and a != b


def test_none_mode_reads_only_the_cond_row(device):
    gen = torch.Generator().manual_seed(8)
    rows = torch.randn(3, 64, generator=gen).to(device)
    rows[1:, 5] = float("nan")  # garbage in rows the mode does not read
    for S in (2, 3):
        t, lp = ops.sample_logits(rows[:S], S, seed=3, step=7, top_p=0.8)
        t1, lp1 = ops.sample_logits(rows[:1], 1, seed=3, step=7, top_p=0.8)
        assert t.item() == t1.item() and lp.item() == lp1.item()


def test_out_tensors_are_written(device):
    rows = make_rows(33, 2, seed=6).to(device)
    tokens = torch.full((1,), 12345, dtype=torch.int64, device=device)
    logprobs = torch.full((1,), float("nan"), device=device)
    t, lp = ops.sample_logits(rows, 2, mode="cfg", seed=1, step=1, out=(tokens, logprobs))
    assert t.data_ptr() == tokens.data_ptr() and lp.data_ptr() == logprobs.data_ptr()
    assert 0 <= tokens.item() < 33 and math.isfinite(logprobs.item())


# ---- flagged groups and special values ---------------------------------------------------------

def test_flagged_groups_do_not_disturb_the_batch(device):
    V = 50
    gen = torch.Generator().manual_seed(12)
    rows = torch.randn(8, V, generator=gen)
    rows[2, 10] = float("nan")  # group 1: NaN in an allowed token of the cond row
    rows[5, 3] = float("inf")   # group 2: +inf in the uncond row
    rows[7, 4] = float("nan")   # group 3: NaN only in a token it does not allow
    allowed = torch.ones(4, V, dtype=torch.bool)
    allowed[0] = False           # group 0: nothing allowed
    allowed[3, 4] = False
    t, lp = ops.sample_logits(rows.to(device), 2, mode="cfg", cfg_scale=2.0, seed=4,
                              step=torch.arange(4, device=device), allowed=allowed.to(device))
    assert t[:3].tolist() == [-1, -1, -1]
    assert torch.isnan(lp[:3]).all()
    alone, _ = ops.sample_logits(rows[6:8].to(device), 2, mode="cfg", cfg_scale=2.0, seed=4,
                                 step=3, allowed=allowed[3:4].to(device))
    assert t[3].item() == alone.item() and t[3].item() != 4


def test_negative_infinity_is_never_drawn(device):
    V = 16
    rows = torch.zeros(2, V)
    rows[0, :8] = float("-inf")  # cond -inf: banned
    rows[1, 8:12] = float("-inf")  # uncond -inf: banned under cfg
    n = 300 if emulated(device) else 2000
    t, lp = ops.sample_logits(rows.repeat(n, 1).to(device), 2, mode="cfg", cfg_scale=2.0,
                              seed=1, step=torch.arange(n, device=device))
    assert set(t.tolist()) == {12, 13, 14, 15}
    torch.testing.assert_close(lp, torch.full_like(lp, math.log(0.25)))
    t, _ = ops.sample_logits(torch.full((1, V), float("-inf"), device=device), 1, seed=1, step=0)
    assert t.item() == -1


# ---- argument errors ----------------------------------------------------------------------------

def _ok_logits(device, R=4, V=10):
    return torch.randn(R, V, device=device)


@pytest.mark.parametrize("kwargs,err,match", [
    ({"streams": 3}, ValueError, "not divisible"),
    ({"streams": 4}, ValueError, "1, 2 or 3"),
    ({"top_p": 0.0}, ValueError, "top_p"),
    ({"top_p": 1.5}, ValueError, "top_p"),
    ({"top_p": float("nan")}, ValueError, "top_p"),
    ({"top_k": -1}, ValueError, "top_k"),
    ({"temperature": -0.5}, ValueError, "temperature"),
    ({"temperature": float("inf")}, ValueError, "temperature"),
    ({"mode": "topk"}, ValueError, "mode"),
    ({"mode": "cfg3", "streams": 2}, ValueError, "needs 3 streams"),
    ({"mode": "cfg", "streams": 1}, ValueError, "needs 2 streams"),
    ({"mode": "cdk", "streams": 2, "cd_alpha": 1.5}, ValueError, "cd_alpha"),
    ({"mode": "cdk", "streams": 2, "cd_k": 0}, ValueError, "cd_k"),
    ({"cfg_scale": float("nan")}, ValueError, "cfg_scale"),
    ({"seed": 1.5}, TypeError, "seed"),
    ({"top_k": 2.5}, TypeError, "top_k"),
])
def test_bad_scalar_arguments(device, kwargs, err, match):
    kw = {"seed": 0, "step": 0, **kwargs}
    with pytest.raises(err, match=match):
        ops.sample_logits(_ok_logits(device), kw.pop("streams", 1), **kw)


def test_bad_tensor_arguments(device):
    logits = _ok_logits(device, R=6, V=40)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)
    f32 = lambda xs: torch.tensor(xs, dtype=torch.float32, device=device)
    base = {"seed": 0, "step": 0, "validate": True}
    cases = [
        ({"streams": i32([2, 2, 1])}, ValueError, "sum to 5"),
        ({"streams": i32([2, 2, 2]), "mode": i32([1, 7, 1])}, ValueError, r"'mode'\[1\]"),
        ({"streams": i32([2, 1, 3]), "mode": ["cfg", "cfg", "cfg3"]}, ValueError,
         "needs 2 streams"),
        ({"streams": i32([2, 2, 2]), "top_p": f32([0.5, 1.2, 0.5])}, ValueError,
         r"'top_p'\[1\]"),
        ({"streams": i32([2, 2, 2]), "top_k": i32([0, 0, -3])}, ValueError, r"'top_k'\[2\]"),
        ({"streams": 2, "top_k": i32([1, 2])}, ValueError, "top_k"),
        ({"streams": 2, "mode": ["cfg", "banana", "cfg"]}, ValueError, "banana"),
        ({"streams": 2, "top_k": f32([1, 2, 3])}, TypeError, "integer"),
        ({"allowed": torch.ones(39, dtype=torch.bool, device=device)}, ValueError, "allowed"),
        ({"allowed": torch.ones(5, 40, dtype=torch.bool, device=device)}, ValueError, "allowed"),
        ({"allowed": torch.ones(40, device=device)}, TypeError, "allowed"),
        ({"allowed_bits": torch.ones(1, dtype=torch.int32, device=device)}, ValueError,
         "allowed_bits"),
        ({"allowed": torch.ones(40, dtype=torch.bool, device=device),
          "allowed_bits": torch.ones(2, dtype=torch.int32, device=device)}, ValueError,
         "at most one"),
    ]
    for kw, err, match in cases:
        args = {**base, **kw}
        streams = args.pop("streams", 1)
        with pytest.raises(err, match=match):
            ops.sample_logits(logits, streams, **args)
    with pytest.raises(TypeError, match="logits"):
        ops.sample_logits(torch.ones(2, 4, dtype=torch.int32, device=device), 1, seed=0, step=0)
    with pytest.raises(ValueError, match="logits"):
        ops.sample_logits(torch.ones(4, device=device), 1, seed=0, step=0)
    with pytest.raises(TypeError, match="out_tokens"):
        ops.sample_logits(logits, 1, seed=0, step=0,
                          out=(torch.empty(6, dtype=torch.int32, device=device),
                               torch.empty(6, device=device)))


# ---- CUDA kernels (GPU and emulated): the same token as the CPU --------------------------------

@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.cuda),
                        pytest.param("emu", marks=pytest.mark.emu)])
def cuda_device(request, device_for):
    yield from device_for(request.param)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu_token_for_token(cuda_device, dtype):
    reps = 2 if emulated(cuda_device) else 8
    for V in (65536, 1000):
        specs, rows, seeds, steps = _mixed_batch(V, seed=V + 1, device="cpu")
        rows = [r.to(dtype) for r in rows]
        many_steps = [s + 100 * k for k in range(reps) for s in steps]
        specs8, rows8, seeds8 = specs * reps, rows * reps, seeds * reps
        with ops.emulated(False):
            cpu_t, cpu_lp = _call_batch(specs8, rows8, seeds8, many_steps, "cpu")
        gpu_t, gpu_lp = _call_batch(specs8, rows8, seeds8, many_steps, cuda_device)
        assert torch.equal(cpu_t, gpu_t.cpu())
        torch.testing.assert_close(cpu_lp, gpu_lp.cpu(), atol=1e-5, rtol=1e-5)
