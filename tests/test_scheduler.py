"""Scheduler without a model: token budget, lockstep groups, FIFO admission, preemption
of the newest request, forks of n samples, and no leaked blocks.

Tokens come from a fixed function of (request, sample, position), so every schedule must
produce the same sequences; the engine tests check the same with real logits."""

from __future__ import annotations

import random

from cm3rt.engine.kv_cache import BlockPool, KVCacheManager
from cm3rt.engine.params import SamplingParams
from cm3rt.engine.request import Request, TokenPrompt
from cm3rt.engine.scheduler import CacheTooSmallError, Scheduler
from cm3rt.engine.sequence import BuiltPrompt
from cm3rt.engine.state import FINISHED, VocabInfo, new_request_state

VOCAB = VocabInfo(vocab_size=64, bos_id=0, eos_id=1, boi_id=2, eoi_id=3,
                  image_token_ids=tuple(range(10, 42)), tokens_per_image=5)
MAX_LEN = 256


def token_for(req_id: int, sample: int, pos: int, in_image: bool) -> int:
    """A deterministic 'sample': image codes inside spans, text (never eos) outside."""
    h = (req_id * 7919 + sample * 104729 + pos * 31) % 1000
    return 10 + h % 32 if in_image else 4 + h % 6


def make_req(i: int, cond, guidance="none", n=1, max_new=8, uncond=None, image_cond=None):
    p = SamplingParams(guidance=guidance, n=n, max_new_tokens=max_new)
    spec = TokenPrompt(cond=list(cond), uncond=uncond, image_cond=image_cond,
                       allow_images=True)
    built = BuiltPrompt(spec=spec, max_new_tokens=max_new,
                        starts_in_image=spec.cond[-1] == VOCAB.boi_id)
    return new_request_state(f"r{i}", i, Request(prompt=spec, params=p), built)


def simulate(sched: Scheduler, reqs, *, arrivals=None, max_steps=5000):
    """Run to completion; checks per-step invariants; returns per-step logs."""
    arrivals = arrivals or {0: reqs}
    log = {"admitted": [], "preempted": [], "failed": [], "tokens": [], "live_streams": []}
    step = 0
    while True:
        for r in arrivals.get(step, []):
            sched.add(r)
        if not sched.has_work and step > max(arrivals):
            break
        before = {id(r) for r in sched.running}
        out = sched.schedule()
        for r in sched.running:
            if id(r) not in before and r not in log["admitted"]:
                log["admitted"].append(r)
        log["preempted"].extend(out.preempted)
        log["failed"].extend(out.failed)
        log["tokens"].append(out.num_tokens)
        log["live_streams"].append(sum(r.num_live_streams for r in sched.running))
        assert out.num_tokens <= sched.max_num_batched_tokens
        # Lockstep: a sampling group's streams all reach their last token this step.
        chunk_end = {id(c.stream): c.start + c.n for c in out.chunks}
        for g in out.samples:
            src = g.leader or g
            for s in src.streams:
                assert chunk_end[id(s)] == len(s.tokens)
        # Blocks of each chunk are allocated.
        for c in out.chunks:
            assert len(c.stream.blocks) * sched.kv.block_size >= c.start + c.n
        tokens = [token_for(int(g.req.request_id[1:]), g.index, len(g.generated), g.in_image)
                  for g in out.samples]
        sched.update(out, tokens, [0.0] * len(tokens), VOCAB, MAX_LEN)
        step += 1
        assert step < max_steps, "scheduler made no progress"
    return log


def outputs(reqs):
    return {r.request_id: [list(g.generated) for g in r.groups] for r in reqs}


def assert_all_free(sched: Scheduler):
    assert sched.pool.num_free == sched.pool.num_blocks
    assert all(r == 0 for r in sched.pool.ref)


def fresh(num_blocks=256, bs=4, max_seqs=16, budget=32, caching=True):
    pool = BlockPool(num_blocks, bs, caching)
    return Scheduler(KVCacheManager(pool), max_seqs, budget, watermark_blocks=1)


def mixed_requests(seed=0, count=10):
    rng = random.Random(seed)
    reqs = []
    for i in range(count):
        cond = [0] + [rng.randrange(4, 10) for _ in range(rng.randrange(1, 40))]
        kind = rng.choice(["none", "cfg", "cfg3"])
        if rng.random() < 0.5:
            cond = cond + [VOCAB.boi_id]
        reqs.append(make_req(
            i, cond, guidance=kind, n=rng.choice([1, 1, 2, 3]), max_new=rng.randrange(1, 12),
            uncond=[0, VOCAB.boi_id] if kind != "none" else None,
            image_cond=cond[:3] + [VOCAB.boi_id] if kind == "cfg3" else None))
    return reqs


def test_everything_completes_within_budget_and_frees_every_block():
    sched = fresh()
    reqs = mixed_requests()
    log = simulate(sched, reqs)
    assert all(r.status == FINISHED and r.error is None for r in reqs)
    for r in reqs:
        for g in r.groups:
            assert len(g.generated) >= 1
            assert g.finish_reason in ("stop", "length")
    assert max(log["tokens"]) <= 32
    assert_all_free(sched)


def test_streams_of_a_group_hold_identical_generated_tokens():
    sched = fresh()
    reqs = mixed_requests(seed=3)
    simulate(sched, reqs)
    for r in reqs:
        for g in r.groups:
            prompts = [r.spec.cond, r.spec.image_cond, r.spec.uncond]
            prompts = [p for p in prompts if p is not None][:len(g.streams)]
            for s in g.streams:
                assert s.tokens[-len(g.generated):] == g.generated
            assert sorted(len(s.tokens) - len(g.generated) for s in g.streams) == sorted(
                len(p) for p in prompts)


def test_admission_is_fifo():
    sched = fresh(num_blocks=24, bs=4, max_seqs=8, budget=16)
    big = make_req(0, [0] + [5] * 60, max_new=20)  # 16 blocks of prompt
    small = [make_req(i, [0, 6, 7], max_new=4) for i in range(1, 6)]
    log = simulate(sched, [big] + small, arrivals={0: [big], 1: small[:2], 2: small[2:]})
    order = [r.request_id for r in log["admitted"]]
    assert order == sorted(order, key=lambda s: int(s[1:]))
    assert_all_free(sched)


def long_requests():
    rng = random.Random(5)
    return [make_req(i, [0] + [rng.randrange(4, 10) for _ in range(rng.randrange(3, 12))],
                     guidance="cfg", n=1 + i % 2, max_new=20, uncond=[0, 7])
            for i in range(8)]


def test_preemption_picks_the_newest_and_reproduces_outputs():
    reqs_a = long_requests()
    simulate(fresh(num_blocks=512), reqs_a)
    reqs_b = long_requests()
    sched = fresh(num_blocks=32, bs=4, max_seqs=16, budget=24)
    preempted_when = []
    orig_preempt = sched._preempt

    def spy(req, out):
        preempted_when.append((req.arrival, [r.arrival for r in sched.running]))
        orig_preempt(req, out)

    sched._preempt = spy
    log = simulate(sched, reqs_b)
    assert sched.num_preemptions > 0, "the tiny cache should force preemption"
    for victim, running in preempted_when:
        assert victim == max(running), "preemption must take the newest running request"
    failed = {r.request_id for r in log["failed"]}
    assert not failed
    assert outputs(reqs_a) == outputs(reqs_b)
    assert_all_free(sched)


def test_n_samples_compute_the_prompt_once_and_share_its_blocks():
    sched = fresh(num_blocks=64, bs=4, budget=64)
    prompt = [0] + list(range(4, 13))  # 10 tokens: 2 full blocks + a partial one
    r = make_req(0, prompt, n=4, max_new=3)
    log = simulate(sched, [r])
    st = sched.pool.stats
    assert log["tokens"][0] == 10, "the prompt is prefilled once, not once per sample"
    assert st.forked_blocks == 3 * 3
    assert st.cow_copies == 3  # the shared partial block, copied by 3 of the 4 writers
    gens = [g.generated for g in r.groups]
    assert len({tuple(x) for x in gens}) == 4
    assert_all_free(sched)


def test_live_streams_never_exceed_max_num_seqs():
    sched = fresh(max_seqs=6, budget=12)
    reqs = mixed_requests(seed=11, count=12)
    reqs = [r for r in reqs if r.num_live_streams <= 6]
    log = simulate(sched, reqs)
    assert max(log["live_streams"]) <= 6
    assert_all_free(sched)


def test_a_request_too_big_for_the_cache_fails_alone_and_others_finish():
    sched = fresh(num_blocks=8, bs=4, budget=16)
    huge = make_req(0, [0] + [5] * 30, max_new=40)  # prompt 8 blocks, grows past the cache
    ok = [make_req(i, [0, 5, 6], max_new=3) for i in range(1, 4)]
    log = simulate(sched, [huge, *ok])
    assert [r.request_id for r in log["failed"]] == ["r0"]
    assert isinstance(huge.error, CacheTooSmallError)
    assert all(r.status == FINISHED and r.error is None for r in ok)
    assert_all_free(sched)


def test_prefix_shared_across_requests_is_counted():
    sched = fresh(num_blocks=64, bs=4, budget=64)
    prefix = [0] + list(range(4, 12))  # 9 tokens: 2 full blocks
    first = make_req(0, prefix + [5, 6], max_new=2)
    later = [make_req(i, prefix + [7, 8, 9], max_new=2) for i in range(1, 4)]
    simulate(sched, [first, *later], arrivals={0: [first], 3: later})
    assert sched.pool.stats.prefix_hit_blocks == 2 * 3
    assert_all_free(sched)
