"""sample_logits benchmarks: the fused op against the same step written as torch ops.

Run: python -m pytest bench/bench_sampling.py -q -s [--bench-device cuda]
The torch baseline, measured in the same run, is the usual sampler: combine cond/uncond
(CFG), softmax with temperature, sort, cumsum, top-p mask, multinomial. Printed: rows/s of
logits, GB/s of logits read (each byte once), the ratio to torch, and the fraction of the
machine's copy bandwidth measured in the same run.
"""

from __future__ import annotations

import pytest
import torch
from _common import copy_bandwidth, record, time_fn

from cm3rt import ops

V = 65536
CFG_SCALE, TOP_P, TEMPERATURE = 3.0, 0.9, 1.0


def torch_cfg_top_p(logits: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    c, u = logits[0::2].float(), logits[1::2].float()
    lg = u + CFG_SCALE * (c - u)
    probs = torch.softmax(lg / TEMPERATURE, dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p
    sorted_p = sorted_p.masked_fill(before >= TOP_P, 0.0)
    pick = torch.multinomial(sorted_p, 1, generator=gen)
    return order.gather(-1, pick)[:, 0]


@pytest.mark.parametrize("G", [16, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sample_logits_cfg_top_p(benchmark, bench_device, G, dtype):
    dev = bench_device
    if dev == "cpu" and dtype != torch.float32:
        pytest.skip("the CPU path of interest is float32 logits")
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2 * G, V, generator=gen) * 3).to(dtype).to(dev)
    steps = torch.arange(G, dtype=torch.int64, device=dev)
    tokens = torch.empty(G, dtype=torch.int64, device=dev)
    logprobs = torch.empty(G, dtype=torch.float32, device=dev)
    run = lambda: ops.sample_logits(logits, 2, mode="cfg", cfg_scale=CFG_SCALE,
                                    temperature=TEMPERATURE, top_p=TOP_P, seed=1, step=steps,
                                    out=(tokens, logprobs))
    benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
    t_ours = time_fn(run, dev, min_time=0.5)
    tgen = torch.Generator(device=dev).manual_seed(0)
    t_torch = time_fn(lambda: torch_cfg_top_p(logits, tgen), dev, min_time=0.5)
    nbytes = logits.numel() * logits.element_size()
    bw = copy_bandwidth(dev)
    record(bench="sample_logits cfg top_p", device=dev, dtype=str(dtype).split(".")[-1], G=G,
           V=V, ms=round(t_ours * 1e3, 3), rows_per_s=f"{2 * G / t_ours:.3g}",
           GBps=round(nbytes / t_ours / 1e9, 2), torch_ms=round(t_torch * 1e3, 3),
           vs_torch=round(t_torch / t_ours, 1), copy_GBps=round(bw / 1e9, 1),
           of_copy=round(nbytes / t_ours / bw, 3))
    # sanity of the benchmarked call: each token is in its group's top-p set, and its logprob
    # is log p / (kept mass) under the float64 distribution
    run()
    c, u = logits[0::2].double(), logits[1::2].double()
    p = torch.softmax(u + CFG_SCALE * (c - u), -1)
    sorted_p, _ = torch.sort(p, -1, descending=True)
    kept_mass = torch.where(torch.cumsum(sorted_p, -1) - sorted_p < TOP_P, sorted_p, 0.0).sum(-1)
    chosen = p.gather(1, tokens[:, None])[:, 0]
    above = torch.where(p > chosen[:, None], p, torch.zeros_like(p)).sum(-1)
    assert bool((above < TOP_P + 1e-4).all())
    torch.testing.assert_close(logprobs.double(), (chosen / kept_mass).log(), atol=2e-3,
                               rtol=1e-3)


@pytest.mark.parametrize("G", [16, 1])
def test_sample_logits_plain(benchmark, bench_device, G):
    """Mode none, no filters: the lower bound of the op's cost (a pass to find the max, one to
    weigh, part of one to draw)."""
    dev = bench_device
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(G, V, generator=gen) * 3).to(dev)
    run = lambda: ops.sample_logits(logits, 1, seed=1, step=0)
    benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
    t_ours = time_fn(run, dev, min_time=0.3)
    tgen = torch.Generator(device=dev).manual_seed(0)
    t_torch = time_fn(lambda: torch.multinomial(torch.softmax(logits, -1), 1, generator=tgen),
                      dev, min_time=0.3)
    nbytes = logits.numel() * logits.element_size()
    bw = copy_bandwidth(dev)
    record(bench="sample_logits plain", device=dev, dtype="float32", G=G, V=V,
           ms=round(t_ours * 1e3, 3), rows_per_s=f"{G / t_ours:.3g}",
           GBps=round(nbytes / t_ours / 1e9, 2), torch_ms=round(t_torch * 1e3, 3),
           vs_torch=round(t_torch / t_ours, 1), copy_GBps=round(bw / 1e9, 1),
           of_copy=round(nbytes / t_ours / bw, 3))
