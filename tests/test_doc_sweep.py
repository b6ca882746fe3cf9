"""Document sweeps (``Request.doc_sweep``): a caption with 0..k_docs retrieved documents, the
one the bank's CLIP scores best against the image, compared with the candidates run as
plain requests; only the sweep's own final event is reported; bad sweeps are refused."""

from __future__ import annotations

import numpy as np
import pytest
from model_fixtures import make_tiny_model_dir
from retrieval_fixtures import make_tiny_clip, random_image

from cm3rt.engine import Engine, Request, SamplingParams
from cm3rt.model import load_pretrained
from cm3rt.retrieval.bank import MemoryBank
from cm3rt.retrieval.clip import ClipEncoder
from cm3rt.tokenizer import ImageTokenizer

pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    model_dir = make_tiny_model_dir(tmp, use_hf=False)
    cfg, w = make_tiny_clip(tmp / "clip", seed=5)
    encoder = ClipEncoder(str(cfg), weights=w)
    rng = np.random.default_rng(9)
    src = tmp / "src"
    src.mkdir()
    for i, cap in enumerate(["a red circle", "a blue square", "a green star", "a cyan cross"]):
        random_image(rng, (20, 18)).save(src / f"doc{i}.png")
        (src / f"doc{i}.txt").write_text(cap)
    MemoryBank.build(src, tmp / "bank", encoder, ImageTokenizer.from_pretrained(model_dir),
                     progress=False).close()
    bank = MemoryBank.open(tmp / "bank", encoder=encoder)
    model, proc = load_pretrained(model_dir)
    yield Engine(model, proc), bank, random_image(rng, (16, 16))
    bank.close()


def caption_request(image, bank, k_docs: int, *, doc_sweep: bool = False, n: int = 1,
                    request_id: str | None = None, seed: int = 0) -> Request:
    return Request(prompt=[image], task="image_to_text", bank=bank, k_docs=k_docs,
                   max_doc_score=None, doc_sweep=doc_sweep, request_id=request_id,
                   params=SamplingParams(guidance="none", temperature=1.0, n=n, seed=seed,
                                         max_new_tokens=6))


def candidates(eng, bank, image, k_docs: int, n: int, seed: int):
    """The sweep's candidates as plain requests: (texts, docs, prompt ids) per sample."""
    out = []
    for k in range(k_docs + 1):
        o = eng.generate([caption_request(image, bank if k else None, k, n=n, seed=seed)])[0]
        assert o.ok, o.error
        out += [(s.text.strip(), o.docs, o.prompt_token_ids) for s in o.samples]
    return out


@pytest.mark.parametrize("n", [1, 2])
def test_sweep_keeps_the_captions_the_banks_clip_scores_best(setup, n):
    eng, bank, image = setup
    seed = 3
    cands = candidates(eng, bank, image, 2, n, seed)
    texts = [t for t, _, _ in cands]
    assert any(texts), "the tiny model should caption something"
    scores = [s if t else None for t, s in zip(texts, bank.score_captions(image, texts))]
    order = sorted(range(len(cands)), key=lambda i: (scores[i] is None, -(scores[i] or 0.0), i))

    events = list(eng.stream([caption_request(image, bank, 2, doc_sweep=True, n=n, seed=seed,
                                              request_id="sweep")]))
    # only the sweep's final event: the candidates' tokens are not the request's output
    assert [ev.request_id for ev in events] == ["sweep"] and events[0].output is not None
    out = events[0].output
    assert out.ok and out.request_id == "sweep"
    assert [s.index for s in out.samples] == list(range(n))
    assert [s.text.strip() for s in out.samples] == [texts[i] for i in order[:n]]
    assert [s.score for s in out.samples] == pytest.approx([scores[i] for i in order[:n]])
    best_docs, best_ids = cands[order[0]][1], cands[order[0]][2]
    assert [d.id for d in out.docs] == [d.id for d in best_docs]
    assert out.prompt_token_ids == best_ids
    assert not eng.has_unfinished() and eng.request_ids() == []


def test_the_candidates_retrieve_zero_to_k_documents(setup):
    eng, bank, image = setup
    docs = {len(c[1]) for c in candidates(eng, bank, image, 3, 1, 0)}
    assert docs == {0, 1, 2, 3}


def test_a_sweep_runs_batched_with_other_requests_and_aborts_whole(setup):
    eng, bank, image = setup
    eng.add_request(caption_request(image, bank, 2, doc_sweep=True, request_id="s1"))
    eng.add_request(caption_request(image, None, 0, request_id="plain"))
    assert sorted(eng.request_ids()) == ["plain", "s1"]
    with pytest.raises(ValueError, match="already in the engine"):
        eng.add_request(caption_request(image, bank, 1, doc_sweep=True, request_id="s1"))
    eng.step()
    out = eng.abort("s1")
    assert out.request_id == "s1"
    assert eng.request_ids() == ["plain"]
    eng.abort("plain")
    assert not eng.has_unfinished()


@pytest.mark.parametrize("kwargs, match", [
    ({"task": "text_to_image"}, "applies to task 'image_to_text'"),
    ({"k_docs": 0}, "needs a bank and k_docs >= 1"),
    ({"bank": None}, "needs a bank and k_docs >= 1"),
    ({"prompt": ["a caption without an image"]}, "needs a prompt holding an image"),
])
def test_bad_sweeps_are_refused_with_the_reason(setup, kwargs, match):
    _, bank, image = setup
    base = {"prompt": [image], "task": "image_to_text", "bank": bank, "k_docs": 2,
            "doc_sweep": True}
    with pytest.raises(ValueError, match=match):
        Request(**{**base, **kwargs})
    with pytest.raises(TypeError, match="doc_sweep' must be a bool"):
        Request(**{**base, "doc_sweep": 1})
