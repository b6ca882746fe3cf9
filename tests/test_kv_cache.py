"""Block pool / KV cache manager: prefix caching, LRU eviction, forks, copy-on-write, no
leaks (checked against an independent count of who holds which block)."""

from __future__ import annotations

import random

import pytest
import torch

from cm3rt.engine.kv_cache import (
    BlockPool,
    KVCacheManager,
    KVSeq,
    PagedKVCache,
    chain_hash,
    num_blocks_for_budget,
)

BS = 4


def make(num_blocks=16, caching=True):
    pool = BlockPool(num_blocks, BS, caching)
    return pool, KVCacheManager(pool)


def run_prefill(kv: KVCacheManager, seq: KVSeq) -> int:
    """Admit, then compute the whole stream in one chunk; returns the cached tokens."""
    cached = kv.admit(seq)
    n = len(seq.tokens) - seq.num_computed
    kv.reserve(seq, n)
    kv.commit(seq, n)
    return cached


def check_invariants(pool: BlockPool, seqs: list[KVSeq]) -> None:
    holders = [0] * pool.num_blocks
    for s in seqs:
        assert len(set(s.blocks)) == len(s.blocks), "a stream holds a block twice"
        for b in s.blocks:
            holders[b] += 1
    assert holders == pool.ref, "reference counts differ from the streams' block tables"
    free = [b for b in range(pool.num_blocks) if pool.ref[b] == 0]
    assert pool.num_free == len(free)
    for h, b in pool.cached.items():
        assert pool.hash_of[b] == h


def test_chain_hash_depends_on_parent_tokens_and_keys():
    a = chain_hash(None, [1, 2, 3, 4])
    assert a == chain_hash(None, [1, 2, 3, 4])
    assert a != chain_hash(None, [1, 2, 3, 5])
    assert chain_hash(a, [5, 6, 7, 8]) != chain_hash(None, [5, 6, 7, 8])
    assert chain_hash(None, [1, 2, 3, 4], ((0, b"img-a"),)) != chain_hash(
        None, [1, 2, 3, 4], ((0, b"img-b"),))


def test_prefix_hit_reuses_full_blocks_but_never_the_last_token():
    pool, kv = make()
    a = KVSeq(tokens=list(range(10)))  # 2 full blocks + 2 tokens
    assert run_prefill(kv, a) == 0
    b = KVSeq(tokens=list(range(9)) + [99])
    assert run_prefill(kv, b) == 8
    assert b.blocks[:2] == a.blocks[:2] and b.blocks[2] != a.blocks[2]
    # A prompt that is exactly the cached prefix keeps its last block uncached.
    c = KVSeq(tokens=list(range(8)))
    assert run_prefill(kv, c) == 4
    assert pool.stats.prefix_hit_blocks == 3
    assert pool.stats.prefix_queried_blocks == 2 + 2 + 1
    check_invariants(pool, [a, b, c])


def test_different_prefix_breaks_the_chain():
    pool, kv = make()
    a = KVSeq(tokens=list(range(12)))
    run_prefill(kv, a)
    b = KVSeq(tokens=[7] + list(range(1, 12)))  # first block differs -> nothing reused
    assert run_prefill(kv, b) == 0
    check_invariants(pool, [a, b])


def test_content_keys_keep_equal_placeholders_apart():
    pool, kv = make()
    toks = [5] * 9
    a = KVSeq(tokens=list(toks), content_keys=[(1, 7, b"image-A")])
    run_prefill(kv, a)
    b = KVSeq(tokens=list(toks), content_keys=[(1, 7, b"image-B")])
    assert run_prefill(kv, b) == 0, "different images must not share blocks"
    c = KVSeq(tokens=list(toks), content_keys=[(1, 7, b"image-A")])
    assert run_prefill(kv, c) == 8
    check_invariants(pool, [a, b, c])


def test_released_blocks_stay_cached_until_evicted_lru():
    pool, kv = make(num_blocks=6)
    a = KVSeq(tokens=list(range(9)))  # blocks: 2 full (cached) + 1 partial
    run_prefill(kv, a)
    a_full = list(a.blocks[:2])
    kv.free(a)
    assert pool.num_free == 6 and len(pool.cached) == 2
    # Plain blocks are handed out before cached ones.
    x = KVSeq(tokens=[100 + i for i in range(12)])
    run_prefill(kv, x)  # takes 3 blocks: the 4 plain ones suffice
    assert len(pool.cached) == 2 + 3  # a's 2 full blocks + x's 3
    assert not set(a_full) & set(x.blocks)
    b = KVSeq(tokens=list(range(9)))
    assert run_prefill(kv, b) == 8, "a's prefix should still be cached"
    kv.free(b)
    kv.free(x)
    # Fill the pool: evicts the least recently released cached blocks first.
    y = KVSeq(tokens=[200 + i for i in range(6 * BS)])
    run_prefill(kv, y)
    assert pool.stats.evictions > 0
    check_invariants(pool, [y])
    kv.free(y)
    assert pool.num_free == 6


def test_fork_shares_blocks_and_copy_on_write_splits_the_partial_block():
    pool, kv = make()
    parent = KVSeq(tokens=list(range(6)))  # one full block + a partial one
    run_prefill(kv, parent)
    kids = [KVSeq(tokens=list(parent.tokens)) for _ in range(3)]
    for k in kids:
        kv.fork(parent, k)
    assert pool.ref[parent.blocks[0]] == 4 and pool.ref[parent.blocks[1]] == 4
    assert pool.num_shared == 2
    seqs = [parent] + kids
    check_invariants(pool, seqs)
    shared_partial = parent.blocks[1]
    copies_seen = []
    for i, s in enumerate(seqs):
        s.tokens.append(1000 + i)
        need = kv.blocks_needed(s, 1)
        copies = kv.reserve(s, 1)
        kv.commit(s, 1)
        copies_seen.append(copies)
        if i < 3:
            assert need == 1 and copies == [(shared_partial, s.blocks[1])]
        else:  # the last holder writes in place
            assert need == 0 and copies == [] and s.blocks[1] == shared_partial
        check_invariants(pool, seqs)
    assert pool.stats.cow_copies == 3
    assert len({s.blocks[1] for s in seqs}) == 4
    assert len({s.blocks[0] for s in seqs}) == 1  # the full prompt block stays shared
    for s in seqs:
        kv.free(s)
    assert pool.num_free == pool.num_blocks


def test_fork_at_block_boundary_needs_no_copy():
    pool, kv = make()
    parent = KVSeq(tokens=list(range(8)))
    run_prefill(kv, parent)
    kid = KVSeq(tokens=list(parent.tokens))
    kv.fork(parent, kid)
    kid.tokens.append(5)
    assert kv.blocks_needed(kid, 1) == 1
    assert kv.reserve(kid, 1) == []
    kv.commit(kid, 1)
    check_invariants(pool, [parent, kid])


def test_admission_cost_counts_shared_hits_once():
    _, kv = make()
    a = KVSeq(tokens=list(range(9)))
    run_prefill(kv, a)
    kv.free(a)  # its 2 full blocks sit cached on the free list
    s1 = KVSeq(tokens=list(range(9)))
    s2 = KVSeq(tokens=list(range(8)) + [50, 51])
    # 3 blocks each, 2 hits each on the same 2 free cached blocks: 1 + 1 fresh + 2 taken.
    assert kv.admission_cost([s1, s2]) == 4
    assert kv.admission_cost([s1, s2], extra_blocks=3) == 7


def test_random_operations_keep_counts_consistent_and_leak_nothing():
    rng = random.Random(1234)
    pool, kv = make(num_blocks=64)
    live: list[KVSeq] = []
    for _ in range(400):
        op = rng.random()
        if op < 0.35 or not live:
            base = rng.choice([[1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 9, 9], []])
            toks = base + [rng.randrange(20) for _ in range(rng.randrange(1, 10))]
            s = KVSeq(tokens=toks)
            if kv.admission_cost([s]) + 2 > pool.num_free:
                continue
            run_prefill(kv, s)
            live.append(s)
        elif op < 0.55:
            p = rng.choice(live)
            if p.num_computed != len(p.tokens):
                continue
            k = KVSeq(tokens=list(p.tokens))
            kv.fork(p, k)
            live.append(k)
        elif op < 0.85:
            s = rng.choice(live)
            n = rng.randrange(1, 6)
            s.tokens.extend(rng.randrange(20) for _ in range(n))
            if kv.blocks_needed(s, n) > pool.num_free:
                s.tokens[-n:] = []
                continue
            kv.reserve(s, n)
            kv.commit(s, n)
        else:
            s = live.pop(rng.randrange(len(live)))
            kv.free(s)
        check_invariants(pool, live)
    for s in live:
        kv.free(s)
    assert pool.num_free == pool.num_blocks
    assert all(r == 0 for r in pool.ref)


def test_copy_blocks_copies_every_layer():
    class FakeModel:
        def allocate_kv_cache(self, nb, bs):
            return [(torch.randn(nb, bs, 2, 3), torch.randn(nb, bs, 2, 3)) for _ in range(2)]

    cache = PagedKVCache(FakeModel(), 5, BS)
    before = [(k.clone(), v.clone()) for k, v in cache.layers]
    cache.copy_blocks([(1, 3), (0, 4)])
    for (k, v), (k0, v0) in zip(cache.layers, before):
        for t, t0 in ((k, k0), (v, v0)):
            assert torch.equal(t[3], t0[1]) and torch.equal(t[4], t0[0])
            assert torch.equal(t[:3], t0[:3])


def test_budget_sizing_and_errors():
    cpu = torch.device("cpu")
    assert num_blocks_for_budget(1000, cpu, budget_bytes=10_500) == 10
    assert num_blocks_for_budget(1000, cpu, budget_bytes=10_500, max_useful_blocks=4) == 4
    assert num_blocks_for_budget(1, cpu, fraction=0.01, max_useful_blocks=7) == 7
    with pytest.raises(ValueError, match="holds no block"):
        num_blocks_for_budget(1000, cpu, budget_bytes=999)
    with pytest.raises(ValueError, match="kv_cache_fraction"):
        num_blocks_for_budget(1000, cpu, fraction=1.5)
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        num_blocks_for_budget(1000, cpu, budget_bytes=-3)
    with pytest.raises(ValueError, match="not both"):
        num_blocks_for_budget(1000, cpu, budget_bytes=10, fraction=0.5)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0, 4)


def test_eviction_takes_the_least_recently_released_cached_block():
    pool, kv = make(num_blocks=4)
    a = KVSeq(tokens=[1, 1, 1, 1, 0])
    b = KVSeq(tokens=[2, 2, 2, 2, 0])
    run_prefill(kv, a)
    run_prefill(kv, b)
    kv.free(a)  # a's full block is released before b's: a is the LRU one
    kv.free(b)
    c = KVSeq(tokens=[3] * 8 + [0])  # 3 blocks: the 2 plain ones, then one eviction
    run_prefill(kv, c)
    assert pool.stats.evictions == 1
    a2, b2 = KVSeq(tokens=[1, 1, 1, 1, 0]), KVSeq(tokens=[2, 2, 2, 2, 0])
    assert kv.admit(b2) == 4, "b's prefix (most recently released) must survive"
    assert kv.admit(a2) == 0, "a's prefix (least recently released) must be evicted"
    check_invariants(pool, [c, a2, b2])
