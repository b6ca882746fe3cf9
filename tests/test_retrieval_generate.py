"""Generation with a memory bank: exactly the chosen documents, laid out as
``caption <boi> image tokens <eoi>``, stand between bos and the prompt (checked on the ids
of the conditional stream), and best-of-n can rank by this CLIP encoder."""

from __future__ import annotations

import numpy as np
import pytest
from model_fixtures import make_tiny_model_dir
from PIL import Image
from retrieval_fixtures import make_tiny_clip, random_image

from cm3rt.api import generate
from cm3rt.engine import Engine, Request, SamplingParams
from cm3rt.model import load_pretrained
from cm3rt.retrieval.bank import MemoryBank
from cm3rt.retrieval.clip import ClipEncoder
from cm3rt.tokenizer import ImageTokenizer, TextTokenizer

PROMPT = "a red circle"


def make_engine(model_dir, **kw) -> Engine:
    model, proc = load_pretrained(model_dir)
    return Engine(model, proc, **kw)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ragen")
    model_dir = make_tiny_model_dir(tmp, use_hf=False)
    cfg, w = make_tiny_clip(tmp / "clip", seed=21)
    encoder = ClipEncoder(str(cfg), weights=w)
    rng = np.random.default_rng(4)
    src = tmp / "src"
    src.mkdir()
    for i, cap in enumerate(["a red circle on white", "a blue square", "a green star",
                             "a yellow triangle"]):
        random_image(rng, (20, 18)).save(src / f"doc{i}.png")
        (src / f"doc{i}.txt").write_text(cap)
    (src / "words.txt").write_text("circles are round")
    random_image(rng, (16, 16)).save(src / "picture.png")
    MemoryBank.build(src, tmp / "bank", encoder, ImageTokenizer.from_pretrained(model_dir),
                     progress=False).close()
    return model_dir, tmp / "bank", src, encoder, make_engine(model_dir)


def doc_ids(doc, src, text_tok, image_tok) -> list[int]:
    """A document's ids from its source files (not from the bank's stored codes)."""
    ids = text_tok.encode(doc.caption) if doc.caption else []
    if doc.modality != "text":
        with Image.open(src / doc.source) as im:
            codes = image_tok.encode([im.copy()])[0]
        ids += [text_tok.boi_id, *text_tok.code_to_id(codes).tolist(), text_tok.eoi_id]
    return ids


@pytest.mark.parametrize("k_docs", [1, 3])
def test_generate_puts_exactly_the_chosen_docs_in_context(setup, k_docs) -> None:
    model_dir, bank_dir, src, encoder, eng = setup
    text_tok = TextTokenizer.from_file(model_dir)
    image_tok = ImageTokenizer.from_pretrained(model_dir)
    with MemoryBank.open(bank_dir, encoder=encoder) as bank:
        chosen = bank.search(text=PROMPT, k=k_docs)  # the default selection rules
    assert len(chosen) == k_docs

    out = generate(PROMPT, model=eng, bank=bank_dir, k_docs=k_docs, guidance="cfg", seed=0)
    want_prefix = [t for d in chosen for t in doc_ids(d, src, text_tok, image_tok)]
    want = [text_tok.bos_id, *want_prefix, *text_tok.encode(PROMPT), text_tok.boi_id]
    assert out.prompt_token_ids == want
    assert [d.id for d in out.docs] == [d.id for d in chosen]
    assert out.image is not None

    plain = generate(PROMPT, model=eng, guidance="cfg", seed=0)
    assert plain.prompt_token_ids == [text_tok.bos_id, *text_tok.encode(PROMPT),
                                      text_tok.boi_id]
    assert plain.docs == []


def test_uncond_docs_puts_the_documents_in_the_unconditional_stream(setup) -> None:
    """uncond_docs: the unconditional stream is <s> docs <mask> <boi> (the conditional one
    unchanged), so guidance contrasts the prompt against the documents; the tokens differ
    from guidance without it, and the default keeps the documents out."""
    from cm3rt.engine.sequence import build_prompt

    _, bank_dir, _src, encoder, eng = setup
    t = eng.processor.text
    bank = MemoryBank.open(bank_dir, encoder=encoder)
    try:
        streams = {}
        for flag in (False, True):
            req = Request(prompt=[PROMPT], task="text_to_image", bank=bank, k_docs=2,
                          params=SamplingParams(guidance="cfg", uncond_docs=flag))
            streams[flag] = build_prompt(req, eng.vocab, eng.processor, 4096)
        cond = streams[True].spec.cond
        assert cond == streams[False].spec.cond
        body = [*t.encode(PROMPT), t.boi_id]
        prefix = cond[1:len(cond) - len(body)]
        assert len(prefix) > 0 and cond[-len(body):] == body
        assert streams[False].spec.uncond == [t.bos_id, t.mask_id, t.boi_id]
        assert streams[True].spec.uncond == [t.bos_id, *prefix, t.mask_id, t.boi_id]
        outs = [generate(PROMPT, model=eng, bank=bank, k_docs=2, guidance="cfg",
                         cfg_scale=4.0, uncond_docs=flag, seed=3) for flag in (False, True)]
        assert outs[0].prompt_token_ids == outs[1].prompt_token_ids
        assert outs[0].samples[0].token_ids != outs[1].samples[0].token_ids
    finally:
        bank.close()
    with pytest.raises(TypeError, match="uncond_docs must be a bool"):
        SamplingParams(uncond_docs=1)


def test_small_context_places_whole_docs_only(setup) -> None:
    model_dir, bank_dir, src, encoder, _ = setup
    text_tok = TextTokenizer.from_file(model_dir)
    image_tok = ImageTokenizer.from_pretrained(model_dir)
    with MemoryBank.open(bank_dir, encoder=encoder) as bank:
        chosen = bank.search(text=PROMPT, k=3)
    sizes = [len(doc_ids(d, src, text_tok, image_tok)) for d in chosen]
    body = [*text_tok.encode(PROMPT)]
    max_new = image_tok.num_tokens + 1
    # Room for the first document and one token less than the second.
    room = sizes[0] + sizes[1] - 1
    ctx = 1 + room + len(body) + 1 + max_new
    eng = make_engine(model_dir, max_model_len=ctx)
    out = generate(PROMPT, model=eng, bank=bank_dir, k_docs=3, guidance="cfg", seed=1,
                   max_new_tokens=max_new)
    placed, used = [], 0
    for d, size in zip(chosen, sizes):
        if used + size <= room:
            placed.append(d)
            used += size
    assert [d.id for d in out.docs] == [d.id for d in placed]
    assert chosen[1].id not in {d.id for d in out.docs}
    want_prefix = [t for d in placed for t in doc_ids(d, src, text_tok, image_tok)]
    assert out.prompt_token_ids == [text_tok.bos_id, *want_prefix, *body, text_tok.boi_id]


def test_best_of_n_ranked_by_clip(setup) -> None:
    _, _, _, encoder, eng = setup
    out = generate(PROMPT, model=eng, guidance="cfg", seed=3, n=3, scorer=encoder.score)
    scores = encoder.score(PROMPT, out.images)
    assert len(scores) == 3
    assert scores == sorted(scores, reverse=True)


def test_max_doc_score_keeps_or_drops_the_closest_document(setup) -> None:
    """Request.max_doc_score is the retrieval rule against documents too close to the query:
    a cut just below the closest document's score drops it, None keeps it, and no setting
    means RA-CM3's 0.9, through generate() as through the bank."""
    _, bank_dir, _, encoder, eng = setup
    query = "a red circle on white"  # a stored caption
    with MemoryBank.open(bank_dir, encoder=encoder) as bank:
        closest = bank.search(text=query, k=1, max_score=None)[0]
        cut = closest.score - 1e-3
        below = bank.search(text=query, k=1, max_score=cut)[0]
        default = bank.search(text=query, k=1)[0]
    assert closest.caption == query and below.id != closest.id

    def docs(**kw):
        out = generate(query, model=eng, bank=bank_dir, k_docs=1, guidance="cfg", seed=0,
                       max_new_tokens=4, **kw)
        return [d.id for d in out.docs]

    assert docs(max_doc_score=None) == [closest.id]
    assert docs(max_doc_score=cut) == [below.id]
    assert docs() == [default.id]  # a given model: RA-CM3's rule
    for bad in (1.5, "high", True):
        with pytest.raises(ValueError, match="max_doc_score"):
            Request(prompt=query, bank=bank_dir, k_docs=1, max_doc_score=bad)
