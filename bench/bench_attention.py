"""paged_attention benchmarks: decode and causal prefill, against torch in the same run.

Run: python -m pytest bench/bench_attention.py -q -s [--bench-device cuda]
Prints GB/s of K/V read (decode), GFLOP/s (prefill), the ratio to torch (gather K/V through
the block table, then scaled_dot_product_attention) and to the copy bandwidth measured in
the same run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _common import copy_bandwidth, record, time_fn

from cm3rt import ops


def paged_setup(B, ctx, H, Hkv, D, BS, dtype, device, q_len):
    gen = torch.Generator().manual_seed(0)
    MB = (ctx + BS - 1) // BS
    NB = B * MB
    k_cache = torch.randn(NB, BS, Hkv, D, generator=gen).to(dtype).to(device)
    v_cache = torch.randn(NB, BS, Hkv, D, generator=gen).to(dtype).to(device)
    block_tables = torch.randperm(NB, generator=gen).to(torch.int32).view(B, MB).to(device)
    seq_lens = torch.full((B,), ctx, dtype=torch.int32, device=device)
    cu = (torch.arange(B + 1, dtype=torch.int32) * q_len).to(device)
    q = torch.randn(B * q_len, H, D, generator=gen).to(dtype).to(device)
    return q, k_cache, v_cache, block_tables, seq_lens, cu


def torch_paged_sdpa(q, k_cache, v_cache, block_tables, ctx, q_len, causal):
    B = block_tables.shape[0]
    Hkv, D = k_cache.shape[2], k_cache.shape[3]
    H = q.shape[1]
    k = k_cache[block_tables.long()].reshape(B, -1, Hkv, D)[:, :ctx].transpose(1, 2)
    v = v_cache[block_tables.long()].reshape(B, -1, Hkv, D)[:, :ctx].transpose(1, 2)
    qq = q.view(B, q_len, H, D).transpose(1, 2)
    return F.scaled_dot_product_attention(qq, k, v, is_causal=causal and q_len > 1,
                                          enable_gqa=True)


@pytest.mark.parametrize("ctx", [1024, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_decode(benchmark, bench_device, ctx, dtype):
    B, H, Hkv, D, BS = 8, 32, 8, 128, 16
    dev = bench_device
    q, kc, vc, bt, sl, cu = paged_setup(B, ctx, H, Hkv, D, BS, dtype, dev, 1)
    ws = ops.paged_attention_workspace(q, B, 1, ctx)
    out = torch.empty_like(q)
    run = lambda: ops.paged_attention(q, kc, vc, bt, sl, cu, out=out, max_q_len=1,
                                      max_seq_len=ctx, workspace=ws)
    benchmark.pedantic(run, rounds=10, warmup_rounds=2, iterations=1)
    t_ours = time_fn(run, dev)
    t_torch = time_fn(lambda: torch_paged_sdpa(q, kc, vc, bt, ctx, 1, True), dev)
    kv_bytes = 2 * B * ctx * Hkv * D * kc.element_size()
    bw = copy_bandwidth(dev)
    record(bench="decode", device=dev, dtype=str(dtype).split(".")[-1], ctx=ctx,
           ms=round(t_ours * 1e3, 3), GBps=round(kv_bytes / t_ours / 1e9, 1),
           torch_GBps=round(kv_bytes / t_torch / 1e9, 1), vs_torch=round(t_torch / t_ours, 2),
           copy_GBps=round(bw / 1e9, 1), of_copy=round(kv_bytes / t_ours / bw, 2))
    # correctness of the benchmarked configuration against torch
    ref = torch_paged_sdpa(q, kc, vc, bt, ctx, 1, True).transpose(1, 2).reshape_as(q)
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_prefill(benchmark, bench_device, dtype):
    S, H, Hkv, D, BS = 2048, 32, 32, 128, 16
    dev = bench_device
    q, kc, vc, bt, sl, cu = paged_setup(1, S, H, Hkv, D, BS, dtype, dev, S)
    out = torch.empty_like(q)
    run = lambda: ops.paged_attention(q, kc, vc, bt, sl, cu, out=out,
                                      max_q_len=S, max_seq_len=S)
    benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
    t_ours = time_fn(run, dev, min_time=1.0)
    t_torch = time_fn(lambda: torch_paged_sdpa(q, kc, vc, bt, S, S, True), dev, min_time=1.0)
    flops = 4 * S * S * H * D / 2  # causal: half of QK^T and PV
    record(bench="prefill", device=dev, dtype=str(dtype).split(".")[-1], ctx=S,
           ms=round(t_ours * 1e3, 2), GFLOPs=round(flops / t_ours / 1e9, 1),
           torch_GFLOPs=round(flops / t_torch / 1e9, 1), vs_torch=round(t_torch / t_ours, 2))
    ref = torch_paged_sdpa(q, kc, vc, bt, S, S, True).transpose(1, 2).reshape_as(q)
    tol = 3e-2 if dtype != torch.float32 else 1e-4
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
