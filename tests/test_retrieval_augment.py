"""retrieve_prefix: the token layout of retrieved documents in front of the prompt, with
cm3rt's own Processor of a tiny random model; expected ids are written out independently of
``Processor.document_ids``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_fixtures import make_tiny_model_dir
from retrieval_fixtures import make_tiny_clip, random_image

from cm3rt.model import load_pretrained
from cm3rt.retrieval.augment import retrieve_prefix
from cm3rt.retrieval.bank import MemoryBank
from cm3rt.retrieval.clip import ClipEncoder


def expected_ids(proc, doc, codes) -> list[int]:
    """The layout: caption tokens, boi, the image ids of the codes, eoi."""
    t = proc.text
    ids = list(t.encode(doc.caption)) if doc.caption else []
    if codes is not None:
        ids += [t.boi_id, *t.image_token_ids[torch.as_tensor(codes)].tolist(), t.eoi_id]
    return ids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(processor, bank dir, source dir, another model's processor)."""
    tmp = tmp_path_factory.mktemp("aug")
    _, proc = load_pretrained(make_tiny_model_dir(tmp, use_hf=False))
    _, other = load_pretrained(make_tiny_model_dir(tmp / "other", use_hf=False, seed=99))
    cfg, w = make_tiny_clip(tmp / "clip", seed=7)
    rng = np.random.default_rng(3)
    src = tmp / "src"
    src.mkdir()
    for i, cap in enumerate(["a red circle", "a blue square", "a green star"]):
        random_image(rng, (16, 16)).save(src / f"mm{i}.png")
        (src / f"mm{i}.txt").write_text(cap)
    random_image(rng, (16, 16)).save(src / "pic.png")
    (src / "words.txt").write_text("shapes on a plain background")
    enc = ClipEncoder(str(cfg), weights=w)
    MemoryBank.build(src, tmp / "bank", enc, proc.image, progress=False).close()
    return proc, tmp / "bank", src, other


def test_layout_and_budget(tiny) -> None:
    proc, path, src, _ = tiny
    tok = proc.image
    t = proc.text
    off = {"max_score": None, "dedupe": None, "prefer_multimodal": False}
    with MemoryBank.open(path, image_tokenizer=tok) as bank:
        everything = bank.search(text="a red circle", k=5, **off)
        assert len(everything) == 5
        from PIL import Image

        def codes_of(doc):
            if doc.modality == "text":
                return None
            with Image.open(src / doc.source) as im:
                return tok.encode([im.copy()])[0].tolist()

        by_id = {d.id: expected_ids(proc, d, codes_of(d)) for d in everything}
        prefix, docs = retrieve_prefix(bank, "a red circle", None, k=5, max_tokens=10_000,
                                       processor=proc, **off)
        assert [d.id for d in docs] == [d.id for d in everything]
        assert prefix == [t for d in everything for t in by_id[d.id]]
        assert t.bos_id not in prefix and t.eos_id not in prefix

        # Default rules: the documents search() chooses, in its order.
        default = bank.search(text="a red circle", k=3)
        prefix, docs = retrieve_prefix(bank, "a red circle", None, 3, 10_000, proc)
        assert [d.id for d in docs] == [d.id for d in default]
        assert prefix == [t for d in default for t in by_id[d.id]]

        # Budgets: whole documents only, best first, a document that does not fit is
        # skipped and a later smaller one may still be placed.
        sizes = [len(by_id[d.id]) for d in everything]
        assert len(set(sizes)) > 1  # documents of different lengths make the check bite
        for budget in range(0, sum(sizes) + 1, 5):
            want, used = [], 0
            for d, size in zip(everything, sizes):
                if used + size <= budget:
                    want.append(d.id)
                    used += size
            prefix, docs = retrieve_prefix(bank, "a red circle", None, 5, budget, proc, **off)
            assert [d.id for d in docs] == want
            assert prefix == [t for i in want for t in by_id[i]]
            assert len(prefix) <= budget

    # A path works too (opened once, cached), and image queries are accepted.
    img = random_image(np.random.default_rng(9))
    p1, d1 = retrieve_prefix(str(path), None, [img], 2, 10_000, proc)
    p2, d2 = retrieve_prefix(path, None, [img], 2, 10_000, proc)
    assert [d.id for d in d1] == [d.id for d in d2]
    assert p1 == p2 and len(d1) == 2


def test_errors(tiny) -> None:
    proc, path, _, other = tiny
    with pytest.raises(ValueError, match="image tokenizer"):
        retrieve_prefix(path, "x", None, 2, 100, other)
    with pytest.raises(TypeError, match="processor"):
        retrieve_prefix(path, "x", None, 2, 100, object())
    with pytest.raises(ValueError, match="k"):
        retrieve_prefix(path, "x", None, -1, 100, proc)
    with pytest.raises(ValueError, match="max_tokens"):
        retrieve_prefix(path, "x", None, 2, 1.5, proc)
    with pytest.raises(TypeError, match="bank"):
        retrieve_prefix(42, "x", None, 2, 100, proc)
    with pytest.raises(ValueError, match="expected text"):
        retrieve_prefix(path, None, None, 2, 100, proc)


def test_layout_with_the_model_tokenizers(tmp_path) -> None:
    """retrieve_prefix with cm3rt.tokenizer's Processor, TextTokenizer and VQGAN codes."""
    from PIL import Image

    model_dir = make_tiny_model_dir(tmp_path, use_hf=False)
    _, proc = load_pretrained(model_dir)
    text_tok, image_tok = proc.text, proc.image
    cfg, w = make_tiny_clip(tmp_path / "clip", seed=8)
    enc = ClipEncoder(str(cfg), weights=w)
    rng = np.random.default_rng(6)
    src = tmp_path / "src"
    src.mkdir()
    for i, cap in enumerate(["a red circle", "a blue square"]):
        random_image(rng, (16, 16)).save(src / f"d{i}.png")
        (src / f"d{i}.txt").write_text(cap)
    (src / "t.txt").write_text("round things")
    with MemoryBank.build(src, tmp_path / "bank", enc, image_tok, progress=False) as bank:
        chosen = bank.search(text="a red circle", k=3, max_score=None, dedupe=None)
        prefix, docs = retrieve_prefix(bank, "a red circle", None, 3, 10_000, proc,
                                       max_score=None, dedupe=None)
    assert [d.id for d in docs] == [d.id for d in chosen] and len(docs) == 3
    want = []
    for d in chosen:
        want += text_tok.encode(d.caption)
        if d.modality != "text":
            with Image.open(src / d.source) as im:
                codes = image_tok.encode([im.copy()])[0]
            want += proc.image_ids(codes)  # boi, image-token ids, eoi
    assert prefix == want
    # The bank refuses a processor whose VQGAN is another one.
    other_dir = make_tiny_model_dir(tmp_path / "other", use_hf=False, seed=99)
    _, other = load_pretrained(other_dir)
    with pytest.raises(ValueError, match="image tokenizer"):
        retrieve_prefix(tmp_path / "bank", "a red circle", None, 2, 10_000, other)
