"""Image-span logits: in a step where every group is inside an image span only the
image-code rows of lm_head are computed and sampled among; tokens and logprobs equal the
full computation's (the tiny model's image ids are shuffled in the vocabulary, so the
id-order mapping is exercised)."""

from __future__ import annotations

import pytest
from model_fixtures import make_tiny_model_dir

from cm3rt.engine import Engine, Request, SamplingParams
from cm3rt.model import load_pretrained

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _requests(image):
    p = SamplingParams
    return [Request("a red circle", params=p(guidance="cfg", seed=1, n=2)),
            Request("a blue square", params=p(guidance="cdk", seed=2, top_k=5)),
            Request("a green star", params=p(guidance="none", seed=3, top_p=0.8)),
            Request("a green star", params=p(guidance="cfg", seed=4, temperature=0.0)),
            Request([image, "make it red"], task="edit",
                    params=p(guidance="cfg3", seed=5)),
            Request("a cat", task="interleaved", params=p(seed=6, max_new_tokens=30)),
            Request([image], task="image_to_text", params=p(seed=7, max_new_tokens=8))]


def test_tokens_equal_the_full_vocabulary_computation(tmp_path, monkeypatch):
    from test_engine_tasks import picture

    model, proc = load_pretrained(make_tiny_model_dir(tmp_path, use_hf=False, seed=21))
    heads: list[int] = []
    real = model.compute_logits

    def spy(hidden, head=None):
        heads.append(-1 if head is None else head.weight.shape[0])
        return real(hidden, head)

    monkeypatch.setattr(model, "compute_logits", spy)
    image = picture(3)
    # The per-op CPU path (compute_logits is what it calls; the whole-step CPU decoder,
    # compared with it below, takes the same heads inside C++).
    full = Engine(model, proc, num_blocks=256, block_size=4, image_span_logits=False,
                  cpu_decoder=False)
    want = full.generate(_requests(image))
    assert heads and set(heads) == {-1}
    heads.clear()
    fast = Engine(model, proc, num_blocks=256, block_size=4, cpu_decoder=False)
    got = fast.generate(_requests(image))
    n_codes = len(proc.text.image_token_ids)
    assert n_codes in heads and -1 in heads  # image-span steps, and the text / mixed ones
    whole = Engine(model, proc, num_blocks=256, block_size=4).generate(_requests(image))
    for w, g, c in zip(want, got, whole):
        assert w.ok and g.ok and c.ok
        for ws, gs, cs in zip(w.samples, g.samples, c.samples):
            assert gs.token_ids == ws.token_ids
            assert gs.logprobs == pytest.approx(ws.logprobs, abs=1e-5)
            assert cs.token_ids == gs.token_ids and cs.logprobs == gs.logprobs
