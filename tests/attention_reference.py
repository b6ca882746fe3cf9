"""Float64 reference for paged attention and helpers to build paged test caches."""

from __future__ import annotations

import math

import torch


def make_paged_batch(seq_lens, q_lens, H, Hkv, D, BS, dtype, device, gen, extra_blocks=3):
    """Random packed queries and a paged cache holding each sequence's keys.

    Blocks are assigned from a shuffled pool (non-contiguous, interleaved across sequences),
    and block tables are padded with garbage ids past each sequence's used blocks.
    Returns a dict with q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, and the
    dense per-sequence keys/values used by the reference.
    """
    B = len(seq_lens)
    blocks_per_seq = [(s + BS - 1) // BS for s in seq_lens]
    MB = max(1, max(blocks_per_seq) + 1)
    NB = sum(blocks_per_seq) + extra_blocks
    perm = torch.randperm(NB, generator=gen)
    k_cache = torch.randn(NB, BS, Hkv, D, generator=gen).to(dtype)
    v_cache = torch.randn(NB, BS, Hkv, D, generator=gen).to(dtype)
    block_tables = torch.full((B, MB), NB + 1000, dtype=torch.int32)  # garbage past the end
    next_block = 0
    keys, values = [], []
    for b, s in enumerate(seq_lens):
        ids = perm[next_block: next_block + blocks_per_seq[b]]
        next_block += blocks_per_seq[b]
        block_tables[b, : len(ids)] = ids.to(torch.int32)
        pos = torch.arange(s)
        blk = block_tables[b, (pos // BS)].long()
        keys.append(k_cache[blk, pos % BS].to(torch.float64))      # [s, Hkv, D]
        values.append(v_cache[blk, pos % BS].to(torch.float64))
    T = sum(q_lens)
    q = torch.randn(T, H, D, generator=gen).to(dtype)
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(q_lens, dtype=torch.int32), 0)
    return {
        "q": q.to(device), "k_cache": k_cache.to(device), "v_cache": v_cache.to(device),
        "block_tables": block_tables.to(device),
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32, device=device),
        "cu_seqlens_q": cu.to(device), "keys": keys, "values": values,
        "q_lens": list(q_lens), "seq_lens_list": list(seq_lens),
    }


def reference_attention(q, keys, values, seq_lens, q_lens, scale, causal):
    """Float64 attention per sequence; returns (out [T, H, D], lse [T, H])."""
    q = q.to(torch.float64).cpu()
    T, H, D = q.shape
    out = torch.zeros(T, H, D, dtype=torch.float64)
    lse = torch.full((T, H), -math.inf, dtype=torch.float64)
    t0 = 0
    for b, (s, ql) in enumerate(zip(seq_lens, q_lens)):
        if ql == 0:
            continue
        k, v = keys[b], values[b]  # [s, Hkv, D]
        Hkv = k.shape[1]
        rep = H // Hkv
        k = k.repeat_interleave(rep, dim=1)  # [s, H, D]
        v = v.repeat_interleave(rep, dim=1)
        qb = q[t0: t0 + ql]  # [ql, H, D]
        scores = torch.einsum("qhd,khd->hqk", qb, k) * scale  # [H, ql, s]
        if causal:
            qpos = torch.arange(ql).unsqueeze(1) + (s - ql)
            kpos = torch.arange(s).unsqueeze(0)
            scores = scores.masked_fill(kpos > qpos, -math.inf)
        m = scores.amax(-1, keepdim=True)
        has = torch.isfinite(m)
        m = torch.where(has, m, torch.zeros_like(m))
        w = torch.exp(scores - m)
        denom = w.sum(-1, keepdim=True)
        p = torch.where(denom > 0, w / denom.clamp_min(1e-300), torch.zeros_like(w))
        out[t0: t0 + ql] = torch.einsum("hqk,khd->qhd", p, v)
        l = torch.where(denom > 0, m + torch.log(denom.clamp_min(1e-300)), torch.full_like(m, -math.inf))
        lse[t0: t0 + ql] = l.squeeze(-1).transpose(0, 1)
        t0 += ql
    return out, lse
