"""Engine end to end on a tiny random Chameleon saved by HF transformers.

The reference is a naive loop written here: full recompute of every stream with
``model.logits`` each token, one ``ops.sample_logits`` call per token with the same
(seed, step) keys, and its own copy of the output grammar (image spans: codes only, exactly
tokens-per-image of them, then a forced end-of-image; guidance inside spans only)."""

from __future__ import annotations

import random

import pytest
import torch

from cm3rt import ops
from cm3rt.engine import (
    Engine,
    Request,
    SamplingError,
    SamplingParams,
    TokenPrompt,
    group_seed,
)

V, NCODES, NTOK = 160, 64, 16  # vocab, image codes, tokens per image (16 px / 4 = 4 x 4)
BOS, EOS, PAD, BOI, EOI = 1, 2, 3, 4, 5
IMAGE_IDS = list(range(V - NCODES, V))
CTX = 256


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    from cm3rt.tokenizer.image_vocab import image_token_name

    vmap = {"<unk>": 0, "<s>": BOS, "</s>": EOS, "<pad>": PAD, "<racm3:break>": BOI,
            "<eoss>": EOI, "<image>": 6}
    vmap.update({f"t{i}": i for i in range(7, V - NCODES)})
    vmap.update({image_token_name(c): V - NCODES + c for c in range(NCODES)})
    cfg = ChameleonConfig(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=CTX,
        vocabulary_map=vmap, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        vq_config={"embed_dim": 32, "num_embeddings": NCODES, "latent_channels": 32,
                   "resolution": 16, "base_channels": 32, "channel_multiplier": [1, 2, 4],
                   "num_res_blocks": 1})
    torch.manual_seed(0)
    hf = ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # sharper than the 0.02-std init: sampling is not near-uniform
        hf.lm_head.weight.mul_(40.0)
    path = tmp_path_factory.mktemp("tiny_chameleon")
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    from cm3rt.model import load_model

    return load_model(model_dir)


def make_engine(model, **kw):
    kw.setdefault("block_size", 4)
    kw.setdefault("num_blocks", 256)
    kw.setdefault("max_num_seqs", 32)
    kw.setdefault("max_num_batched_tokens", 64)
    return Engine(model, **kw)


# --- the naive reference --------------------------------------------------------------------
def naive_allowed(in_image: bool, allow_images: bool) -> torch.Tensor:
    m = torch.zeros(V, dtype=torch.bool)
    if in_image:
        m[IMAGE_IDS] = True
        return m
    m[:] = True
    m[IMAGE_IDS] = False
    m[EOI] = False
    m[PAD] = False
    if not allow_images:
        m[BOI] = False
    return m


def naive_generate(model, tp: TokenPrompt, p: SamplingParams, max_new: int,
                   stop_after_images=None) -> list[list[int]]:
    prompts = [tp.cond]
    if p.guidance == "cfg3":
        prompts.append(tp.image_cond)
    if p.guidance != "none":
        prompts.append(tp.uncond)
    samples = []
    for i in range(p.n):
        seed = group_seed(p.seed, i)
        seqs = [list(x) for x in prompts]
        gen: list[int] = []
        in_image = tp.cond[-1] == BOI
        codes = images = 0
        while True:
            guided = in_image and len(seqs) > 1
            rows = seqs if guided else seqs[:1]
            logits = torch.stack([model.logits(torch.tensor([s]))[0, -1] for s in rows])
            tok, _ = ops.sample_logits(
                logits, len(rows), mode=p.guidance if guided else "none",
                temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                cfg_scale=p.cfg_scale, cfg_image_scale=p.cfg_image_scale,
                cd_alpha=p.cd_alpha, cd_k=p.cd_k,
                allowed_bits=ops.pack_allowed_bits(
                    naive_allowed(in_image, tp.allow_images).to(logits.device)),
                seed=seed, step=len(gen))
            t = int(tok[0])
            assert t >= 0
            new = [t]
            if in_image:
                codes += 1
                if codes == NTOK and len(gen) + 1 < max_new:
                    new.append(EOI)
                    in_image, codes = False, 0
                    images += 1
            elif t == BOI:
                in_image = True
            for s in seqs:
                s.extend(new)
            gen.extend(new)
            if (t == EOS and not in_image and new == [t]) or len(gen) >= max_new \
                    or len(seqs[0]) >= CTX:
                break
            if stop_after_images and images >= stop_after_images:
                break
        samples.append(gen)
    return samples


def text_to_image(seed, guidance="cfg", n=1, prompt_len=5, **kw):
    rng = random.Random(seed)
    cond = [BOS] + [rng.randrange(7, V - NCODES) for _ in range(prompt_len)] + [BOI]
    tp = TokenPrompt(cond=cond, uncond=[BOS, BOI], image_cond=[BOS, 9, 9, BOI],
                     stop_after_images=1)
    return Request(tp, params=SamplingParams(guidance=guidance, n=n, seed=seed, **kw))


def text_request(seed, max_new=12, allow_images=True, **kw):
    rng = random.Random(seed)
    cond = [BOS] + [rng.randrange(7, V - NCODES) for _ in range(rng.randrange(2, 9))]
    tp = TokenPrompt(cond=cond, uncond=[BOS], allow_images=allow_images)
    return Request(tp, params=SamplingParams(seed=seed, max_new_tokens=max_new, **kw))


def expected(model, req: Request):
    tp, p = req.prompt, req.params
    max_new = p.max_new_tokens or (NTOK + 1 if tp.cond[-1] == BOI else NTOK + 66)
    return naive_generate(model, tp, p, max_new, tp.stop_after_images)


def tokens_of(out):
    assert out.error is None, out.error
    return [s.token_ids for s in sorted(out.samples, key=lambda s: s.index)]


# --- tests ----------------------------------------------------------------------------------
def test_engine_equals_naive_loop_token_for_token(model):
    reqs = [
        text_to_image(1, "cfg", cfg_scale=3.0),
        text_to_image(2, "cfg3", cfg_scale=2.0, cfg_image_scale=1.5, top_k=20),
        text_to_image(3, "cdk", cd_alpha=0.2, cd_k=2, n=2),
        text_to_image(4, "none", temperature=0.0),
        text_request(5, max_new=25, top_p=0.9, temperature=0.8),
        text_request(6, max_new=9, guidance="cfg", allow_images=False),
    ]
    eng = make_engine(model, max_num_batched_tokens=16)  # small budget: chunked prefill
    outs = eng.generate(reqs)
    for req, out in zip(reqs, outs):
        assert tokens_of(out) == expected(model, req), req.params
    assert eng.pool.num_free == eng.pool.num_blocks


def test_image_span_has_exactly_the_image_tokens_then_end_of_image(model):
    eng = make_engine(model)
    (out,) = eng.generate([text_to_image(7, "cfg", n=3)])
    for s in out.samples:
        assert len(s.token_ids) == NTOK + 1
        assert all(t in IMAGE_IDS for t in s.token_ids[:NTOK])
        assert s.token_ids[-1] == EOI and s.finish_reason == "stop"
        assert s.logprobs[-1] == 0.0  # forced, not sampled


def test_a_request_alone_and_amid_eight_others_gives_the_same_tokens(model):
    probe = text_to_image(11, "cfg", n=2)
    (alone,) = make_engine(model).generate([probe])
    others = [text_to_image(100 + i, random.Random(i).choice(["cfg", "none", "cdk"]),
                            prompt_len=3 + i) for i in range(4)]
    others += [text_request(200 + i, max_new=5 + i) for i in range(4)]
    mixed = make_engine(model, max_num_batched_tokens=24).generate(
        others[:5] + [text_to_image(11, "cfg", n=2)] + others[5:])
    assert tokens_of(mixed[5]) == tokens_of(alone)


def test_cfg_with_scale_one_equals_no_guidance(model):
    a = text_to_image(21, "cfg", cfg_scale=1.0)
    b = text_to_image(21, "none")
    outs = make_engine(model).generate([a, b])
    assert tokens_of(outs[0]) == tokens_of(outs[1])


def test_preemption_under_a_tiny_cache_completes_with_the_same_tokens(model):
    def reqs():
        return [text_to_image(30 + i, "cfg", n=1 + i % 2, prompt_len=4 + 3 * i)
                for i in range(5)]

    ref = make_engine(model).generate(reqs())
    eng = make_engine(model, num_blocks=20)  # 80 token slots for ~ 10 streams of ~ 25
    outs = eng.generate(reqs())
    assert eng.num_preemptions > 0
    for a, b in zip(ref, outs):
        assert tokens_of(a) == tokens_of(b)
    assert eng.pool.num_free == eng.pool.num_blocks


def test_n_samples_share_prompt_blocks_and_prefix_hits_are_counted(model):
    eng = make_engine(model)
    first = text_to_image(40, "cfg", n=4, prompt_len=9)  # cond: 11 tokens -> 2 full blocks
    (o1,) = eng.generate([first])
    st = eng.stats
    assert st.forked_blocks == 3 * (3 + 1)  # 3 followers x (cond 3 blocks + uncond 1)
    assert st.cow_copies == 3 * 2  # each follower's partial cond and uncond block
    assert st.prefix_hit_blocks == 0
    (o2,) = eng.generate([text_to_image(40, "cfg", n=4, prompt_len=9)])
    assert eng.stats.prefix_hit_blocks == 2
    assert tokens_of(o1) == tokens_of(o2)
    plain = make_engine(model, enable_prefix_caching=False)
    (o3,) = plain.generate([text_to_image(40, "cfg", n=4, prompt_len=9)])
    assert tokens_of(o3) == tokens_of(o1)
    assert plain.stats.prefix_hit_blocks == 0


def test_no_block_leaks_after_200_random_requests(model):
    rng = random.Random(0)
    eng = make_engine(model, num_blocks=96, max_num_batched_tokens=48)
    reqs = []
    for i in range(200):
        kind = rng.random()
        if kind < 0.4:
            reqs.append(text_to_image(i, rng.choice(["none", "cfg", "cfg3", "cdk"]),
                                      n=rng.choice([1, 1, 2]), prompt_len=rng.randrange(1, 12),
                                      max_new_tokens=rng.randrange(1, NTOK + 2)))
        else:
            reqs.append(text_request(i, max_new=rng.randrange(1, 8),
                                     guidance=rng.choice(["none", "cfg"])))
    outs = eng.generate(reqs)
    assert all(o.error is None for o in outs)
    assert all(len(s.token_ids) >= 1 for o in outs for s in o.samples)
    assert eng.pool.num_free == eng.pool.num_blocks
    assert all(r == 0 for r in eng.pool.ref)
    assert not eng.scheduler.running and not eng.scheduler.waiting


def test_bad_input_is_rejected_clearly_and_others_are_served(model):
    eng = make_engine(model)
    good = text_to_image(50, "cfg")
    long_prompt = TokenPrompt(cond=[BOS] + [9] * CTX)
    bad = [
        Request(TokenPrompt(cond=[])),
        Request(TokenPrompt(cond=[BOS, 9, BOI]), params=SamplingParams(guidance="cfg")),
        Request(long_prompt),
        Request(TokenPrompt(cond=[BOS, V + 3])),
        Request(["a cat", [1, 2, 3]], task="text_to_image"),
    ]
    outs = eng.generate([good, *bad, text_request(51)])
    assert outs[0].ok and outs[-1].ok
    assert tokens_of(outs[0]) == tokens_of(make_engine(model).generate([good])[0])
    msgs = [str(o.error) for o in outs[1:-1]]
    assert "empty" in msgs[0]
    assert "uncond" in msgs[1]
    assert "too long" in msgs[2] and str(CTX) in msgs[2]
    assert "outside the vocabulary" in msgs[3]
    assert isinstance(outs[5].error, TypeError) and "prompt[1]" in msgs[4]
    with pytest.raises(ValueError, match="guidance"):
        SamplingParams(guidance="classifier-free")
    with pytest.raises(ValueError, match="n must be >= 1"):
        SamplingParams(n=0)
    with pytest.raises(TypeError, match="temperature"):
        SamplingParams(temperature="hot")
    with pytest.raises(ValueError, match="too long"):
        eng.add_request(Request(long_prompt))
    assert eng.pool.num_free == eng.pool.num_blocks


def test_sampler_failure_fails_only_that_request(model, monkeypatch):
    # The per-op step samples with ops.sample_logits, poisoned below (the whole-step CPU
    # decoder, which a packed model takes at every step, samples inside C++).
    eng = make_engine(model, cpu_decoder=False)
    poisoned_seed = group_seed(666, 0)
    real = ops.sample_logits

    def sampler(logits, streams, **kw):
        tok, lp = real(logits, streams, **kw)
        seeds = kw["seed"]
        return torch.where(seeds == poisoned_seed, -1, tok), lp

    monkeypatch.setattr(ops, "sample_logits", sampler)
    reqs = [text_to_image(60, "cfg"), text_to_image(666, "cfg"), text_request(61)]
    outs = eng.generate(reqs)
    assert outs[0].ok and outs[2].ok
    assert isinstance(outs[1].error, SamplingError)
    assert eng.pool.num_free == eng.pool.num_blocks


def test_stream_yields_every_token_then_the_output(model):
    eng = make_engine(model)
    reqs = [text_to_image(70, "cfg", n=2), text_request(71, max_new=6)]
    events = list(eng.stream(reqs))
    finals = {e.request_id: e.output for e in events if e.output is not None}
    assert len(finals) == 2
    for rid, out in finals.items():
        for s in out.samples:
            got = [e.token for e in events if e.request_id == rid and e.sample == s.index
                   and e.output is None]
            assert got == s.token_ids
    img = [e for e in events if e.image_pos is not None]
    assert sorted({e.image_pos for e in img}) == list(range(NTOK))
    ref = make_engine(model).generate([text_to_image(70, "cfg", n=2), text_request(71, 6)])
    for o in ref:
        assert tokens_of(o) == tokens_of(finals[o.request_id])


def test_decode_graphs_match_eager_steps(model_dir, device):
    """On CUDA, decode steps replayed from CUDA graphs give the eager steps' tokens."""
    from cm3rt.model import load_model

    if device == "cpu":
        pytest.skip("CUDA graphs are CUDA-only (the CPU path is the eager one tested above)")
    m = load_model(model_dir, device=device)
    reqs = lambda: [text_to_image(80 + i, "cfg", n=2) for i in range(3)]
    eager = make_engine(m, use_cuda_graphs=False)
    graphs = make_engine(m, use_cuda_graphs=True)
    a = eager.generate(reqs())
    b = graphs.generate(reqs())
    assert graphs.runner.graphs is not None and not graphs.runner.graphs.disabled
    assert graphs.runner.graphs.graphs, "no decode step was captured"
    for x, y in zip(a, b):
        assert tokens_of(x) == tokens_of(y)
    for req, out in zip(reqs(), a):
        assert tokens_of(out) == expected(m, req)


@pytest.mark.parametrize("cpu_decoder", [False, True], ids=["per-op", "whole-step"])
def test_a_failing_model_step_fails_its_requests_and_the_engine_recovers(model, monkeypatch,
                                                                         cpu_decoder):
    eng = make_engine(model, cpu_decoder=cpu_decoder)
    eng.raise_step_errors = False  # serving behaviour (the suite sets it True)
    # The second forward fails, whichever path runs it (decode steps take the whole-step
    # CPU decoder when the engine has one).
    owner = eng.runner.cpu_decoder if cpu_decoder else model
    name = "step_sample" if cpu_decoder else "forward_step"
    assert owner is not None
    real = getattr(owner, name)
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated device failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, flaky)
    outs = eng.generate([text_to_image(90, "cfg"), text_request(91)])
    assert calls["n"] >= 2
    assert all(isinstance(o.error, RuntimeError) for o in outs)
    assert "simulated device failure" in str(outs[0].error)
    assert eng.pool.num_free == eng.pool.num_blocks
    monkeypatch.setattr(owner, name, real)
    (ok,) = eng.generate([text_to_image(92, "cfg")])
    assert tokens_of(ok) == expected(model, text_to_image(92, "cfg"))


def test_step_by_step_use_keeps_no_outputs_behind(model):
    eng = make_engine(model)
    rid = eng.add_request(text_request(95, max_new=4))
    finals = []
    while eng.has_unfinished():
        finals += [e.output for e in eng.step() if e.output is not None]
    assert [o.request_id for o in finals] == [rid] and finals[0].ok
    assert not eng._requests  # the engine keeps nothing of a finished request
    with pytest.raises(ValueError, match="unknown"):
        eng.abort(rid)


def test_a_step_error_propagates_when_raise_step_errors(model, monkeypatch):
    """In the test suite (and with CM3RT_RAISE_STEP_ERRORS=1) a bug in a step is raised with
    its traceback, not turned into a failed request."""
    eng = make_engine(model)
    assert eng.raise_step_errors

    def broken(*args, **kwargs):
        raise TypeError("a programming error")

    monkeypatch.setattr(model, "forward_step", broken)
    monkeypatch.setattr(eng.runner.cpu_decoder, "step", broken)
    with pytest.raises(TypeError, match="a programming error"):
        eng.generate([text_request(96)])
