"""paged_attention and kv_append against a float64 reference, on every device present."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from attention_reference import make_paged_batch, reference_attention
from device_kinds import cuda_kernels, emulated

from cm3rt import ops

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def dtypes_for(device):
    return [torch.float32, torch.bfloat16] + ([torch.float16] if cuda_kernels(device) else [])


def run_case(device, dtype, seq_lens, q_lens, H, Hkv, D, BS, causal=True, seed=0, lse=True):
    gen = torch.Generator().manual_seed(seed)
    batch = make_paged_batch(seq_lens, q_lens, H, Hkv, D, BS, dtype, device, gen)
    T = sum(q_lens)
    out = torch.full((T, H, D), float("nan"), dtype=dtype, device=device)  # poisoned
    scale = 1.0 / math.sqrt(D)
    res = ops.paged_attention(
        batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"],
        batch["seq_lens"], batch["cu_seqlens_q"], scale=scale, causal=causal, out=out,
        return_lse=lse,
    )
    got, got_lse = res if lse else (res, None)
    assert got.data_ptr() == out.data_ptr()
    # The reference sees the same rounded inputs the kernel saw.
    q_used = batch["q"].cpu()
    ref, ref_lse = reference_attention(q_used, batch["keys"], batch["values"],
                                       seq_lens, q_lens, scale, causal)
    tol = TOL[dtype]
    torch.testing.assert_close(got.cpu().to(torch.float64), ref, atol=tol, rtol=tol)
    if lse:
        torch.testing.assert_close(got_lse.cpu().to(torch.float64), ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("BS", [16, 32])
@pytest.mark.parametrize("seq_len", [1, 7, 97, 1025])
def test_decode_single(device, D, BS, seq_len):
    for dtype in dtypes_for(device):
        run_case(device, dtype, [seq_len], [1], H=8, Hkv=2, D=D, BS=BS, seed=seq_len + D)


@pytest.mark.parametrize("H,Hkv", [(4, 4), (8, 2), (8, 1), (12, 3)])
def test_gqa_ratios_mixed_batch(device, H, Hkv):
    # prefill, chunked prefill after a cached prefix, decode, in one call
    long = (160, 400) if emulated(device) else (300, 1025)  # emulated: trimmed
    seq_lens = [97, long[0], 7, long[1], 1, 64]
    q_lens = [97, 45, 1, 1, 1, 17]
    for dtype in dtypes_for(device):
        run_case(device, dtype, seq_lens, q_lens, H=H, Hkv=Hkv, D=64, BS=16, seed=H * 7 + Hkv)


@pytest.mark.parametrize("D", [32, 64, 80, 96, 128, 256])
def test_head_dims_prefill(device, D):
    for dtype in dtypes_for(device):
        run_case(device, dtype, [33, 130], [33, 70], H=4, Hkv=2, D=D, BS=16, seed=D)


@pytest.mark.parametrize("causal", [True, False])
def test_long_prefill_split(device, causal):
    # one long sequence: the CPU kernel splits the key range and merges by LSE (emulated:
    # still 10 query tiles over 19 key tiles, at a ninth of the cost)
    S, Q = (300, 150) if emulated(device) else (1025, 513)
    run_case(device, torch.float32, [S], [Q], H=2, Hkv=1, D=128, BS=32, causal=causal, seed=3)


# ---- prefill regimes of the CPU tile kernel (csrc/attention/prefill_cpu_avx512.cpp) ----------
# Items of 64 query rows (tokens x the query heads of one kv head, 16 rows a vector) over
# blocks of 64 keys, the causal mask only on blocks that reach past a tile's first row, bf16
# in pairs (VDPBF16PS); items of fewer than 10 rows, and groups above 64 heads, stay on the
# portable path. The same cases check the CUDA kernels on a GPU / under the emulator.

@pytest.mark.parametrize("q_len", [10, 13, 64, 77, 130])
def test_prefill_query_tiles_ending_mid_block(device, q_len):
    # 1 kv head of 1 query head: tiles of 64 tokens. 77 = 64 + 13 (a partial row vector),
    # 130 = 2 x 64 + 2 (a 2-row item on the portable path). Sequence 0 has a 45-key cached
    # prefix, so its causal diagonal is not aligned to the key blocks; sequence 1 starts at 0.
    for dtype in dtypes_for(device):
        run_case(device, dtype, [q_len + 45, q_len], [q_len, q_len], H=1, Hkv=1, D=64, BS=16,
                 seed=q_len)


@pytest.mark.parametrize("H,Hkv", [(6, 3), (12, 4), (16, 2), (64, 1), (80, 1)])
def test_prefill_gqa_groups(device, H, Hkv):
    # groups 2, 3 (21 tokens = 63 rows per tile), 8, 64 (one token per tile) and 80 (more
    # heads than a tile holds: the portable path)
    seq_lens, q_lens = ([90, 40], [90, 25]) if emulated(device) else ([150, 90], [150, 40])
    for dtype in dtypes_for(device):
        run_case(device, dtype, seq_lens, q_lens, H=H, Hkv=Hkv, D=64, BS=16, seed=H + Hkv)


@pytest.mark.parametrize("D", [32, 80, 96, 256])
def test_prefill_head_dims_over_key_blocks(device, D):
    # 200 queries after a 100-key prefix: 5 key blocks, the diagonal ones masked per row;
    # D = 80 is 40 bf16 pairs (a masked tail in the tile's transpose of q)
    S, Q = (150, 90) if emulated(device) else (300, 200)
    for dtype in dtypes_for(device):
        run_case(device, dtype, [S], [Q], H=2, Hkv=1, D=D, BS=32, seed=D + 1)


@pytest.mark.parametrize("BS", [1, 7, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_prefill_page_sizes_and_masking(device, BS, causal):
    # key blocks gathered across many pages (1, 7) or inside one (128); non-causal: every
    # row sees every key, the cached prefix included
    seq_lens, q_lens = [181, 70], [120, 70]
    for dtype in dtypes_for(device):
        run_case(device, dtype, seq_lens, q_lens, H=4, Hkv=2, D=64, BS=BS, causal=causal,
                 seed=BS + 10 * causal)


def test_prefill_float16_cache(device):
    # float16 on every device (the CPU tile kernel widens it to fp32)
    run_case(device, torch.float16, [200, 70, 9], [200, 20, 9], H=4, Hkv=2, D=128, BS=16,
             seed=16)


def run_with_24_threads(cases: str) -> None:
    """Run ``cases`` (code calling run_case) in a fresh interpreter with 24 OpenMP threads, so
    that the CPU kernel plans key splits on any machine. torch sets the threads when
    imported, so they are set after the import; cm3rt shares torch's libgomp."""
    package_root = Path(ops.__file__).resolve().parents[1]  # the cm3rt this run imported
    script = ("import torch\ntorch.set_num_threads(24)\nfrom test_attention import run_case\n"
              + cases + "print('SPLITS OK')\n")
    env = {**os.environ, "OMP_WAIT_POLICY": "passive",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(package_root)])}
    out = subprocess.run([sys.executable, "-P", "-c", script], env=env, check=False,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SPLITS OK" in out.stdout


def test_cpu_prefill_key_splits_merge():
    # The CPU kernel splits the key range when its items cannot keep 4x the OpenMP threads
    # busy (a few long sequences on a many-core machine). 24 threads make those splits on any
    # machine: [1025] x [513] with 2 heads on 1 kv head is 17 items, so 4 splits of 257 keys
    # (the last tiles' splits straddle the diagonal, the first tiles' last splits are empty);
    # [2000, 300] x [64, 300] with 4 heads per kv head is 46 items, 3 splits of the first
    # sequence after its cached prefix. torch sets the OpenMP threads when imported (to the
    # cores), so the script sets them after the import; cm3rt shares torch's libgomp.
    cases = textwrap.dedent("""
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for causal in (True, False):
                run_case("cpu", dtype, [1025], [513], H=2, Hkv=1, D=128, BS=32,
                         causal=causal, seed=3)
            run_case("cpu", dtype, [2000, 300], [64, 300], H=8, Hkv=2, D=64, BS=16, seed=4)
    """)
    run_with_24_threads(cases)


# ---- decode regime of the CPU decode kernel (csrc/attention/decode_cpu_avx512.cpp) ---------
# Sequences of q_len <= 4 (decode, speculative verify): one item for all kv heads, keys in
# blocks of 64 (gathered across pages, scored 16 at a time), query rows in register blocks
# of 4 (then 3, 2 or 1) per kv head, bf16 in pairs (VDPBF16PS). Items of more than 64 rows
# per kv head (q_len x group) stay on the portable path. The same cases check the CUDA
# kernels on a GPU / under the emulator.

# Context lengths: one key; a page block and a key block ending mid-way (15, 63, 200 =
# 3 x 64 + 8); exactly one key block (64); one past (65); 5 x 64 + 13 (333).
DECODE_SEQ_LENS = [4, 15, 63, 64, 65, 200, 333]


@pytest.mark.parametrize("q_len", [1, 2, 3, 4])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (8, 4), (16, 4), (16, 2), (40, 5), (80, 1)])
def test_decode_query_lengths_and_groups(device, q_len, H, Hkv):
    # groups 1, 2, 4, 8 (q_len x group rows per kv head: 1 to 32, every register block
    # size), 8 over 5 kv heads, and 80 (80 to 320 rows: the portable path); each row's
    # causal limit ends at a different key of the last block
    seq_lens = DECODE_SEQ_LENS
    if emulated(device):  # trimmed
        seq_lens = [15, 65] if H >= 40 else DECODE_SEQ_LENS[::2]
    for dtype in dtypes_for(device):
        run_case(device, dtype, seq_lens, [q_len] * len(seq_lens), H=H, Hkv=Hkv, D=64, BS=16,
                 seed=q_len * 100 + H + Hkv)


@pytest.mark.parametrize("D", [32, 64, 80, 96, 128, 256])
def test_decode_head_dims(device, D):
    # every supported head dim runs on the decode kernel; D = 80 and 96 are not whole
    # 32-element bf16 vectors (80: a half-vector tail in both products), D = 256 runs P V in
    # two passes over the keys
    for dtype in dtypes_for(device):
        run_case(device, dtype, [200, 65, 7], [1, 3, 4], H=8, Hkv=2, D=D, BS=16, seed=D + 7)


@pytest.mark.parametrize("BS", [1, 7, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_decode_page_sizes_and_masking(device, BS, causal):
    # key blocks gathered from 64 pages (1), across page boundaries (7), or inside one page
    # (128); non-causal: the verify rows see every key
    for dtype in dtypes_for(device):
        run_case(device, dtype, [333, 130, 9], [4, 1, 2], H=8, Hkv=2, D=64, BS=BS,
                 causal=causal, seed=BS + 10 * causal)


def test_decode_float16_cache(device):
    # float16 on every device (the CPU decode kernel widens it to fp32)
    run_case(device, torch.float16, DECODE_SEQ_LENS, [1, 2, 3, 4, 1, 2, 3], H=16, Hkv=4, D=128,
             BS=16, seed=17)


def test_cpu_decode_key_splits_merge():
    # Decode items split their key range when they cannot keep 4x the OpenMP threads busy;
    # 24 threads make those splits on any machine: 3 items (one per sequence) against a
    # target of 96 give 4, 11 and 1 splits of [1025, 3000, 70], the q_len-4 sequence's
    # splits clipped to its last row's causal limit, with rows of every register block size
    # (groups 4 and 3). See test_cpu_prefill_key_splits_merge for the thread setup.
    cases = textwrap.dedent("""
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for causal in (True, False):
                run_case("cpu", dtype, [1025, 3000, 70], [1, 4, 2], H=8, Hkv=2, D=128, BS=16,
                         causal=causal, seed=5)
            run_case("cpu", dtype, [2000, 777], [3, 1], H=6, Hkv=2, D=80, BS=32, seed=6)
    """)
    run_with_24_threads(cases)


def test_zero_length_query_sequence(device):
    # a sequence with no query rows this step contributes nothing and breaks nothing
    run_case(device, torch.float32, [10, 20, 5], [3, 0, 5], H=4, Hkv=2, D=64, BS=16, seed=11)


def test_noncontiguous_q_and_out(device):
    gen = torch.Generator().manual_seed(5)
    H, Hkv, D, BS = 4, 2, 64, 16
    batch = make_paged_batch([40, 9], [40, 1], H, Hkv, D, BS, torch.float32, device, gen)
    T = 41
    # q as a slice of a fused QKV projection: token stride > H * D
    qkv = torch.randn(T, (H + 2 * Hkv) * D, generator=gen).to(device)
    q = qkv[:, : H * D].view(T, H, D)
    assert not q.is_contiguous()
    out_buf = torch.full((T, H, 2 * D), float("nan"), device=device)
    out = out_buf[:, :, :D]
    ops.paged_attention(q, batch["k_cache"], batch["v_cache"], batch["block_tables"],
                        batch["seq_lens"], batch["cu_seqlens_q"], out=out)
    ref, _ = reference_attention(q.cpu(), batch["keys"], batch["values"], [40, 9], [40, 1],
                                 1 / math.sqrt(D), True)
    torch.testing.assert_close(out.cpu().double(), ref, atol=2e-5, rtol=2e-5)
    assert torch.isnan(out_buf[:, :, D:]).all()  # nothing written outside `out`


def test_kv_append_roundtrip(device):
    gen = torch.Generator().manual_seed(1)
    NB, BS, Hkv, D, T = 9, 16, 2, 64, 37
    for dtype in dtypes_for(device):
        k_cache = torch.full((NB, BS, Hkv, D), float("nan"), dtype=dtype, device=device)
        v_cache = torch.full_like(k_cache, float("nan"))
        k = torch.randn(T, Hkv, D, generator=gen).to(dtype).to(device)
        v = torch.randn(T, Hkv, D, generator=gen).to(dtype).to(device)
        slots = torch.randperm(NB * BS, generator=gen)[:T].to(torch.int32)
        slots[5] = -1  # padding token: skipped
        ops.kv_append(k, v, k_cache, v_cache, slots.to(device))
        kc = k_cache.cpu().view(NB * BS, Hkv, D)
        vc = v_cache.cpu().view(NB * BS, Hkv, D)
        keep = slots >= 0
        assert torch.equal(kc[slots[keep].long()], k.cpu()[keep])
        assert torch.equal(vc[slots[keep].long()], v.cpu()[keep])
        written = torch.zeros(NB * BS, dtype=torch.bool)
        written[slots[keep].long()] = True
        assert torch.isnan(kc[~written]).all() and torch.isnan(vc[~written]).all()


def test_kv_append_then_attention_matches_dense(device):
    """Prefill through kv_append, then decode steps; equals dense attention each step."""
    gen = torch.Generator().manual_seed(9)
    H, Hkv, D, BS, NB = 4, 2, 64, 16, 12
    k_cache = torch.zeros(NB, BS, Hkv, D, device=device)
    v_cache = torch.zeros_like(k_cache)
    table = torch.randperm(NB, generator=gen)[:6].to(torch.int32).view(1, 6)
    keys = torch.randn(70, Hkv, D, generator=gen)
    vals = torch.randn(70, Hkv, D, generator=gen)
    qs = torch.randn(70, H, D, generator=gen)
    slots = (table[0, torch.arange(70) // BS] * BS + torch.arange(70) % BS).to(torch.int32)
    # prefill 50 tokens, then 20 single-token decode steps
    ops.kv_append(keys[:50].to(device), vals[:50].to(device), k_cache, v_cache, slots[:50].to(device))
    steps = [(0, 50)] + [(i, i + 1) for i in range(50, 70)]
    for a, b in steps:
        if a > 0:
            ops.kv_append(keys[a:b].to(device), vals[a:b].to(device), k_cache, v_cache,
                          slots[a:b].to(device))
        out = ops.paged_attention(
            qs[a:b].to(device), k_cache, v_cache, table.to(device),
            torch.tensor([b], dtype=torch.int32, device=device),
            torch.tensor([0, b - a], dtype=torch.int32, device=device))
        ref, _ = reference_attention(qs[a:b], [keys[:b].double()], [vals[:b].double()],
                                     [b], [b - a], 1 / math.sqrt(D), True)
        torch.testing.assert_close(out.cpu().double(), ref, atol=2e-5, rtol=2e-5)


# ---- bad input: a clear error, never a crash or an out-of-bounds write -------------------

def _small(device):
    gen = torch.Generator().manual_seed(2)
    return make_paged_batch([20, 5], [4, 1], 4, 2, 64, 16, torch.float32, device, gen)


def _call(b, **over):
    args = {"q": b["q"], "k_cache": b["k_cache"], "v_cache": b["v_cache"],
            "block_tables": b["block_tables"], "seq_lens": b["seq_lens"],
            "cu_seqlens_q": b["cu_seqlens_q"]}
    args.update(over)
    return ops.paged_attention(**args, validate=True)


def test_bad_dtype(device):
    b = _small(device)
    with pytest.raises(TypeError, match="'k_cache'.*same dtype"):
        _call(b, k_cache=b["k_cache"].double())
    with pytest.raises(TypeError, match="'block_tables' must be int32"):
        _call(b, block_tables=b["block_tables"].long())
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        _call(b, seq_lens=[20, 5])


def test_bad_shapes(device):
    b = _small(device)
    with pytest.raises(ValueError, match="'q' must have shape"):
        _call(b, q=b["q"][:, :, :32].contiguous())
    with pytest.raises(ValueError, match="multiple of kv heads"):
        _call(b, q=torch.zeros(5, 3, 64, device=device))
    with pytest.raises(ValueError, match="'cu_seqlens_q' must have shape"):
        _call(b, cu_seqlens_q=b["cu_seqlens_q"][:2])
    with pytest.raises(ValueError, match="'v_cache' must have shape"):
        _call(b, v_cache=b["v_cache"][:, :8].contiguous())


def test_bad_indices(device):
    b = _small(device)
    NB = b["k_cache"].shape[0]
    bt = b["block_tables"].clone()
    bt[0, 0] = NB  # block id out of range
    with pytest.raises(ValueError, match=r"block_tables\[0, 0\] = .* out of range"):
        _call(b, block_tables=bt)
    bt = b["block_tables"].clone()
    bt[1, 0] = -1
    with pytest.raises(ValueError, match=r"block_tables\[1, 0\]"):
        _call(b, block_tables=bt)
    with pytest.raises(ValueError, match="non-decreasing"):
        _call(b, cu_seqlens_q=torch.tensor([0, 6, 5], dtype=torch.int32, device=device),
              q=torch.zeros(5, 4, 64, device=device))
    with pytest.raises(ValueError, match="must equal the number of query rows"):
        _call(b, cu_seqlens_q=torch.tensor([0, 4, 4], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match=r"seq_lens\[0\]"):
        _call(b, seq_lens=torch.tensor([10**6, 5], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match=r"seq_lens\[0\]"):  # fewer keys than queries
        _call(b, seq_lens=torch.tensor([2, 5], dtype=torch.int32, device=device))


def test_kv_append_bad_slots(device):
    k_cache = torch.zeros(4, 16, 2, 64, device=device)
    v_cache = torch.zeros_like(k_cache)
    k = torch.ones(3, 2, 64, device=device)
    with pytest.raises(ValueError, match=r"'slots'\[1\] = 64 is out of range"):
        ops.kv_append(k, k, k_cache, v_cache,
                      torch.tensor([0, 64, 1], dtype=torch.int32, device=device), validate=True)
    assert k_cache.abs().sum() == 0  # nothing written
    with pytest.raises(ValueError, match="'slots' must have shape"):
        ops.kv_append(k, k, k_cache, v_cache, torch.tensor([0, 1], dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="'k' must have shape"):
        ops.kv_append(torch.ones(3, 3, 64, device=device), k, k_cache, v_cache,
                      torch.tensor([0, 1, 2], dtype=torch.int32, device=device))


def test_build_info_reports():
    info = ops.build_info()
    assert info["simd"] and isinstance(info["cuda"], bool)
    assert info["cuda_devices"] >= 0


# ---- CUDA-only paths: split-KV decode batches, bad block ids, workspace, graph capture ------

def _cuda_only():
    from conftest import CUDA_READY
    return pytest.mark.skipif(not CUDA_READY, reason="no CUDA device (or cm3rt built without CUDA)")


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.cuda),
                        pytest.param("emu", marks=pytest.mark.emu)])
def cuda_device(request, device_for):
    """The CUDA kernels' own paths: on the GPU, and under the emulator."""
    yield from device_for(request.param)


def _check(out, lse, batch, seq_lens, q_lens, D, causal, dtype, skip_rows=()):
    ref, ref_lse = reference_attention(batch["q"].cpu(), batch["keys"], batch["values"],
                                       seq_lens, q_lens, 1 / math.sqrt(D), causal)
    keep = torch.ones(ref.shape[0], dtype=torch.bool)
    keep[list(skip_rows)] = False
    torch.testing.assert_close(out.cpu().double()[keep], ref[keep], atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(lse.cpu().double()[keep], ref_lse[keep], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("D", [80, 256])
def test_cuda_decode_batch_split_kv(cuda_device, D):
    # max_q_len=1 selects the split-KV decode kernel: 12 query heads on 1 kv head (3 head
    # chunks per CTA group), a sequence with no query row, long and tiny sequences
    seq_lens, q_lens = [1500, 600, 2, 900], [1, 0, 1, 1]
    gen = torch.Generator().manual_seed(D)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        batch = make_paged_batch(seq_lens, q_lens, 12, 1, D, 16, dtype, cuda_device, gen)
        out = torch.full((3, 12, D), float("nan"), dtype=dtype, device=cuda_device)
        _, lse = ops.paged_attention(
            batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"],
            batch["seq_lens"], batch["cu_seqlens_q"], out=out, return_lse=True,
            max_q_len=1, max_seq_len=max(seq_lens))
        _check(out, lse, batch, seq_lens, q_lens, D, True, dtype)


@pytest.mark.parametrize("decode", [False, True])
def test_cuda_bad_block_id_gives_nan_rows(cuda_device, decode):
    # without validate, a block id out of range must not be read: rows that attend a key of
    # that block come out NaN (output and lse), every other row stays exact
    gen = torch.Generator().manual_seed(77)
    seq_lens, q_lens = ([1000, 50], [1, 1]) if decode else ([100, 50], [100, 10])
    for dtype in (torch.float32, torch.bfloat16):
        batch = make_paged_batch(seq_lens, q_lens, 4, 2, 64, 16, dtype, cuda_device, gen)
        NB = batch["k_cache"].shape[0]
        bt = batch["block_tables"].clone()
        bt[0, 40 if decode else 3] = -3 if decode else NB + 5
        T = sum(q_lens)
        out = torch.full((T, 4, 64), 0.0, dtype=dtype, device=cuda_device)
        _, lse = ops.paged_attention(
            batch["q"], batch["k_cache"], batch["v_cache"], bt, batch["seq_lens"],
            batch["cu_seqlens_q"], out=out, return_lse=True, max_q_len=1 if decode else None)
        # decode: row 0 attends every key of sequence 0; prefill: rows 48.. reach block 3
        bad_rows = [0] if decode else list(range(48, 100))
        assert torch.isnan(out[bad_rows].float()).all() and torch.isnan(lse[bad_rows]).all()
        _check(out, lse, batch, seq_lens, q_lens, 64, True, dtype, skip_rows=bad_rows)


def test_cuda_workspace_too_small_raises(cuda_device):
    gen = torch.Generator().manual_seed(3)
    batch = make_paged_batch([2000], [1], 8, 2, 64, 16, torch.float16, cuda_device, gen)
    assert ops.paged_attention_workspace(batch["q"], 1, 1, 2000) is not None  # a split plan
    with pytest.raises(ValueError, match="argument 'workspace' must hold at least"):
        ops.paged_attention(batch["q"], batch["k_cache"], batch["v_cache"],
                            batch["block_tables"], batch["seq_lens"], batch["cu_seqlens_q"],
                            max_q_len=1, max_seq_len=2000,
                            workspace=torch.empty(16, dtype=torch.uint8, device=cuda_device))


@pytest.mark.parametrize("decode", [False, True])
def test_cuda_garbage_lengths_stay_in_bounds(cuda_device, decode):
    # unvalidated CUDA index tensors with nonsense lengths: the kernels clamp them, so the
    # call reads and writes nothing outside its tensors (the emulator checks every access)
    gen = torch.Generator().manual_seed(41)
    seq_lens, q_lens = ([600, 50, 30], [1, 1, 1]) if decode else ([100, 50, 30], [20, 10, 5])
    batch = make_paged_batch(seq_lens, q_lens, 4, 2, 64, 16, torch.bfloat16, cuda_device, gen)
    sl = torch.tensor([1 << 30, -5, 1 << 30], dtype=torch.int32, device=cuda_device)
    cu = batch["cu_seqlens_q"].clone()
    cu[1], cu[2] = -7, 1 << 30
    out, lse = ops.paged_attention(
        batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"], sl, cu,
        return_lse=True, max_q_len=1 if decode else None, max_seq_len=max(seq_lens))
    if cuda_device == "cuda":
        torch.cuda.synchronize()
    assert out.shape == batch["q"].shape and lse.shape == batch["q"].shape[:2]


@pytest.mark.cuda
@_cuda_only()
def test_cuda_decode_step_graph_capture():
    # the decode path allocates nothing and never synchronises: it captures and replays
    gen = torch.Generator().manual_seed(4)
    seq_lens, q_lens = [1200, 333], [1, 1]
    batch = make_paged_batch(seq_lens, q_lens, 8, 2, 128, 16, torch.bfloat16, "cuda", gen)
    args = (batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"],
            batch["seq_lens"], batch["cu_seqlens_q"])
    ws = ops.paged_attention_workspace(batch["q"], 2, 1, 1200)
    out = torch.empty(2, 8, 128, dtype=torch.bfloat16, device="cuda")
    eager = ops.paged_attention(*args, max_q_len=1, max_seq_len=1200, workspace=ws).clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
        ops.paged_attention(*args, out=out, max_q_len=1, max_seq_len=1200, workspace=ws)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.paged_attention(*args, out=out, max_q_len=1, max_seq_len=1200, workspace=ws)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
