"""vq_nearest / vq_embed benchmarks against torch (and faiss when installed), same run.

Run: python -m pytest bench/bench_vq.py -q -s [--bench-device cuda]
vq_nearest N=1024, K=8192, C=256: printed GFLOP/s (2*N*K*C per call), the ratio to torch's
addmm + argmin (which writes and re-reads the [N, K] distance matrix) and to faiss
IndexFlatL2 (CPU), whose BLAS-plus-argmin search is the peer to catch.
"""

from __future__ import annotations

import pytest
import torch
from _common import copy_bandwidth, record, time_fn

from cm3rt import ops

N, K, C = 1024, 8192, 256


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_vq_nearest(benchmark, bench_device, dtype):
    dev = bench_device
    if dev == "cpu" and dtype != torch.float32:
        pytest.skip("the CPU kernel takes float32")
    gen = torch.Generator().manual_seed(0)
    cb32 = torch.randn(K, C, generator=gen)
    z32 = cb32[torch.randint(0, K, (N,), generator=gen)] + 0.3 * torch.randn(N, C, generator=gen)
    cb, z = cb32.to(dtype).to(dev), z32.to(dtype).to(dev)
    sq = (cb.float() ** 2).sum(1)
    out = torch.empty(N, dtype=torch.int64, device=dev)
    run = lambda: ops.vq_nearest(z, cb, sq, out=out)
    benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
    t_ours = time_fn(run, dev, min_time=0.5)
    t_torch = time_fn(lambda: torch.addmm(sq.to(dtype), z, cb.t(), beta=1, alpha=-2).argmin(1),
                      dev, min_time=0.5)
    flops = 2 * N * K * C
    row = {"bench": "vq_nearest", "device": dev, "dtype": str(dtype).split(".")[-1],
           "N": N, "K": K, "C": C, "ms": round(t_ours * 1e3, 2),
           "GFLOPs": round(flops / t_ours / 1e9, 1), "torch_ms": round(t_torch * 1e3, 2),
           "vs_torch": round(t_torch / t_ours, 2)}
    faiss = _faiss()
    if faiss is not None and dev == "cpu":
        index = faiss.IndexFlatL2(C)
        index.add(cb32.numpy())
        zn = z32.numpy()
        t_faiss = time_fn(lambda: index.search(zn, 1), dev, min_time=0.5)
        row.update(faiss_ms=round(t_faiss * 1e3, 2), vs_faiss=round(t_faiss / t_ours, 2))
        _, fidx = index.search(zn, 1)
        agree = (torch.from_numpy(fidx[:, 0]) == out.cpu()).double().mean().item()
        row.update(agree_faiss=round(agree, 4))
    record(**row)
    run()
    ref = torch.addmm(sq, z.float(), cb.float().t(), beta=1, alpha=-2).argmin(1)
    assert (out == ref).double().mean().item() > 0.99


def test_vq_embed(benchmark, bench_device):
    dev = bench_device
    gen = torch.Generator().manual_seed(1)
    cb = torch.randn(K, C, generator=gen).to(dev)
    idx = torch.randint(0, K, (64, 1024), generator=gen).to(dev)  # 64 images of 32x32 tokens
    out = torch.empty(64, 1024, C, device=dev)
    run = lambda: ops.vq_embed(idx, cb, out=out)
    benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
    t_ours = time_fn(run, dev, min_time=0.3)
    t_torch = time_fn(lambda: torch.index_select(cb, 0, idx.view(-1)), dev, min_time=0.3)
    nbytes = 2 * out.numel() * out.element_size()  # read the rows, write the output
    bw = copy_bandwidth(dev)
    record(bench="vq_embed", device=dev, dtype="float32", n=idx.numel(), C=C,
           ms=round(t_ours * 1e3, 3), GBps=round(nbytes / t_ours / 1e9, 1),
           torch_ms=round(t_torch * 1e3, 3), vs_torch=round(t_torch / t_ours, 2),
           of_copy=round(nbytes / t_ours / bw, 2))
    assert torch.equal(out, cb[idx])
