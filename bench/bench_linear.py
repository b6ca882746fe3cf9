"""ops.linear (weight-streaming, few rows) against torch's F.linear on the same weights.

Run: OMP_WAIT_POLICY=passive python -m pytest bench/bench_linear.py -q -s

For M = 1 .. 512 rows and a 2816 x 1024 weight (the mid-size model's gate/up): microseconds
per call of torch fp32 / bf16 and cm3rt fp32 / bf16 / int8 on [N, K] weights (ops.linear)
and on panels (ops.linear_packed, "pk_" columns: the layout the model uses where
chameleon.packs_weights says), the share of the read
bandwidth each cm3rt kernel reaches, the share of the CPU's fp32 multiply-add rate it
reaches (measured in the same run as torch's square fp32 GEMM, MKL's near-peak case), and
the largest M where cm3rt's bf16 beats torch's (the model's KERNEL_ROWS crossover, for
[N, K] weights), and whether the packed kernels beat torch at every M (packed models send
every row count to them). The
two shares tell which wall a row count is against. cm3rt runs the best CPU kernel the
machine has (ops.linear_cpu_kernels(), printed first): the AVX-512 and portable kernels
widen to fp32 and multiply there, so narrower weights cut the bytes but not the
multiply-adds and from a few rows up the multiply-adds are the floor; the AMX kernel
(bf16 and int8 weights) multiplies in tiles far above the read rate.
One thread: the decode step of the CPU engine runs its GEMMs on the threads it has.

``test_linear_dram_resident``: the same shape at M = 8 (4 CFG pairs), cycling over 40
weight matrices (fp32 460 MB, bf16 230 MB, int8 115 MB: past any L3), as a decode step reads
its weights: microseconds per call and the share of the read bandwidth measured in the same
run, at 1 and 2 threads, [N, K] and packed. This is where the weight prefetch matters (L1 vs L2,
linear_cpu_avx512.cpp).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import read_bandwidth, record, time_fn

from cm3rt import ops


def test_linear_vs_torch():
    torch.set_num_threads(1)
    N, K = 2816, 1024
    w = torch.randn(N, K)
    wb = w.bfloat16()
    q, s = ops.quantize_int8(w)
    pw, pwb, pq = ops.linear_pack(w), ops.linear_pack(wb), ops.linear_pack(q)
    bw = read_bandwidth()
    a, b = torch.randn(768, 768), torch.randn(768, 768)
    mac_rate = 768 ** 3 / time_fn(lambda: torch.mm(a, b))  # fp32 multiply-adds per second
    record(bench="linear", M="kernels", torch_f32=" > ".join(ops.linear_cpu_kernels()))
    record(bench="linear", M="fp32 GEMM", torch_f32=f"{mac_rate / 1e9:.1f} G multiply-adds/s")
    best, packed_slower_than_torch = 0, []
    for M in (1, 2, 4, 8, 12, 16, 32, 64, 128, 512):
        x = torch.randn(M, K)
        xb = x.bfloat16()
        t = {"torch_f32": time_fn(lambda x=x: F.linear(x, w)),
             "torch_bf16": time_fn(lambda xb=xb: F.linear(xb, wb)),
             "cm3rt_f32": time_fn(lambda x=x: ops.linear(x, w)),
             "cm3rt_bf16": time_fn(lambda xb=xb: ops.linear(xb, wb)),
             "cm3rt_int8": time_fn(lambda x=x: ops.linear(x, q, s)),
             "pk_f32": time_fn(lambda x=x: ops.linear_packed(x, pw, N)),
             "pk_bf16": time_fn(lambda xb=xb: ops.linear_packed(xb, pwb, N)),
             "pk_int8": time_fn(lambda x=x: ops.linear_packed(x, pq, N, s))}
        if t["cm3rt_bf16"] < t["torch_bf16"]:
            best = M
        for d in ("f32", "bf16"):
            if t[f"pk_{d}"] >= t[f"torch_{d}"]:
                packed_slower_than_torch.append(f"{d} M={M}")
        nbytes = {"f32": 4 * N * K, "bf16": 2 * N * K, "int8": N * K}
        record(bench="linear", M=M, **{k: f"{v * 1e6:.0f}us" for k, v in t.items()},
               cm3rt_bf16_of_read_bw=f"{nbytes['bf16'] / t['cm3rt_bf16'] / bw:.2f}",
               cm3rt_int8_of_read_bw=f"{nbytes['int8'] / t['cm3rt_int8'] / bw:.2f}",
               pk_bf16_of_read_bw=f"{nbytes['bf16'] / t['pk_bf16'] / bw:.2f}",
               **{f"{k}_{d}_of_gemm_rate": f"{M * N * K / t[f'{k}_{d}'] / mac_rate:.2f}"
                  for k in ("cm3rt", "pk") for d in ("f32", "bf16", "int8")})
    record(bench="linear", M="crossover", cm3rt_bf16=f"cm3rt bf16 faster up to M={best}",
           pk_f32="packed slower than torch at: " + (", ".join(packed_slower_than_torch)
                                                     or "no M measured"))


def sweep(weights, x, out) -> None:
    """One call of ops.linear per [N, K] weight matrix, in turn."""
    for w, s in weights:
        ops.linear(x, w, s, out=out)


def sweep_packed(weights, n, x, out) -> None:
    """One call of ops.linear_packed per packed weight matrix, in turn."""
    for w, s in weights:
        ops.linear_packed(x, w, n, s, out=out)


def test_linear_dram_resident():
    N, K, M, copies = 2816, 1024, 8, 40
    bw = read_bandwidth()
    record(bench="linear_dram", dtype="kernels", us=" > ".join(ops.linear_cpu_kernels()),
           of_read_bw=f"read {bw / 1e9:.1f} GB/s")
    torch.manual_seed(0)
    for dtype in ("fp32", "bf16", "int8"):
        weights = []
        for _ in range(copies):
            w = torch.randn(N, K)
            weights.append((w, None) if dtype == "fp32" else
                           (w.bfloat16(), None) if dtype == "bf16" else ops.quantize_int8(w))
        x = torch.randn(M, K) if dtype == "fp32" else torch.randn(M, K).bfloat16()
        out = torch.empty(M, N, dtype=x.dtype)
        nbytes = weights[0][0].numel() * weights[0][0].element_size()
        for layout in ("nk", "packed"):
            if layout == "packed":  # same values, panels; the [N, K] copies freed first
                weights = [(ops.linear_pack(w), s) for w, s in weights]
            run = (lambda: sweep(weights, x, out)) if layout == "nk" else \
                (lambda: sweep_packed(weights, N, x, out))  # noqa: B023 - called here
            for threads in (1, 2):
                torch.set_num_threads(threads)
                t = time_fn(run) / copies
                record(bench="linear_dram", dtype=dtype, layout=layout, threads=threads, M=M,
                       us=f"{t * 1e6:.0f}", of_read_bw=f"{nbytes / t / bw:.2f}")
    torch.set_num_threads(1)
