"""Selection rules (cap, dedupe, modality preference, k) on hand-built embeddings,
directly and through a memory bank."""

from __future__ import annotations

import numpy as np
import pytest
from retrieval_fixtures import GridTokenizer

from cm3rt.retrieval.bank import DocInput, MemoryBank
from cm3rt.retrieval.clip import EncoderIdentity
from cm3rt.retrieval.select import SelectionParams, select_documents

E = 4


def vec(*xs: float) -> np.ndarray:
    v = np.array(xs, dtype=np.float64)
    return v / np.linalg.norm(v)


def test_cap_drops_too_similar() -> None:
    scores = [0.99, 0.91, 0.9, 0.5]
    emb = np.eye(E)
    got = select_documents(scores, emb, ["text"] * 4, SelectionParams(k=4, max_score=0.9))
    assert got == [2, 3]  # 0.9 itself stays (strictly greater is dropped)
    got = select_documents(scores, emb, ["text"] * 4, SelectionParams(k=4, max_score=None))
    assert got == [0, 1, 2, 3]


def test_dedupe_against_chosen_only() -> None:
    a = vec(1, 0, 0, 0)
    a2 = vec(1, 0.1, 0, 0)  # cos(a, a2) ~ 0.995
    b = vec(0, 1, 0, 0)
    b2 = vec(0.05, 1, 0, 0)  # cos(b, b2) ~ 0.9988, cos(a, b2) ~ 0.05
    emb = np.stack([a, a2, b, b2])
    scores = [0.8, 0.79, 0.7, 0.69]
    p = SelectionParams(k=4, max_score=None, dedupe=0.95)
    assert select_documents(scores, emb, ["text"] * 4, p) == [0, 2]
    # A duplicate of a *dropped* (too similar) doc is not a duplicate of a chosen one.
    p = SelectionParams(k=4, max_score=0.75, dedupe=0.95)
    assert select_documents([0.8, 0.74, 0.7, 0.69], emb, ["text"] * 4, p) == [1, 2]
    p = SelectionParams(k=4, max_score=None, dedupe=None)
    assert select_documents(scores, emb, ["text"] * 4, p) == [0, 1, 2, 3]


def test_prefer_multimodal() -> None:
    emb = np.eye(E)
    mods = ["text", "image+text", "image", "image+text"]
    scores = [0.8, 0.7, 0.75, 0.6]
    p = SelectionParams(k=2, max_score=None, dedupe=None, prefer_multimodal=True)
    assert select_documents(scores, emb, mods, p) == [1, 3]
    # Too few multimodal docs: the rest filled by score.
    p = SelectionParams(k=3, max_score=None, dedupe=None, prefer_multimodal=True)
    assert select_documents(scores, emb, mods, p) == [0, 1, 3]
    p = SelectionParams(k=2, max_score=None, dedupe=None, prefer_multimodal=False)
    assert select_documents(scores, emb, mods, p) == [0, 2]


def test_k_larger_than_candidates_and_bad_params() -> None:
    emb = np.eye(E)[:2]
    assert select_documents([0.3, 0.4], emb, ["text", "text"], SelectionParams(k=10)) == [1, 0]
    assert select_documents(np.zeros(0), np.zeros((0, E)), [], SelectionParams(k=3)) == []
    with pytest.raises(ValueError, match="k"):
        SelectionParams(k=0)
    with pytest.raises(ValueError, match="modalities"):
        select_documents([0.1], emb[:1], ["video"], SelectionParams())
    with pytest.raises(ValueError, match="embeddings"):
        select_documents([0.1, 0.2], emb[:1], ["text", "text"], SelectionParams())


def test_rules_through_a_bank(tmp_path) -> None:
    ident = EncoderIdentity(arch="hand-built", embed_dim=E, digest="0" * 64)
    tok = GridTokenizer(side=2)
    bank = MemoryBank.create(tmp_path / "bank", ident, image_tokenizer=tok, index="flat")
    q = vec(1, 0, 0, 0)
    docs = {
        "copy-of-query": (vec(1, 0.01, 0, 0), "text"),         # score ~1 > cap
        "best-text": (vec(1, 0.6, 0, 0), "text"),              # ~0.857
        "near-dup-text": (vec(1, 0.62, 0, 0), "text"),        # ~0.850, dup of best-text
        "mm-a": (vec(1, 0, 0.8, 0), "image+text"),            # ~0.78
        "mm-a-dup": (vec(1, 0, 0.82, 0), "image+text"),       # dup of mm-a
        "mm-b": (vec(1, 0, 0, 1.1), "image+text"),            # ~0.67
        "image-only": (vec(1, 0, 0, 1.5), "image"),           # ~0.55
        "far": (vec(0, 1, 1, 1), "text"),                      # 0
    }
    codes = np.arange(tok.num_tokens)
    inputs = [DocInput(name, caption=None if mod == "image" else name,
                       codes=None if mod == "text" else codes)
              for name, (_, mod) in docs.items()]
    bank.add_documents(inputs, np.stack([e for e, _ in docs.values()]))
    bank.flush()
    assert {d.source: d.modality for d in bank.get(range(len(docs)))} == {
        n: m for n, (_, m) in docs.items()}
    got = [d.source for d in bank.search(embedding=q, k=2)]
    assert got == ["mm-a", "mm-b"]
    got = [d.source for d in bank.search(embedding=q, k=3, prefer_multimodal=False)]
    assert got == ["best-text", "mm-a", "mm-b"]
    got = [d.source for d in bank.search(embedding=q, k=3, max_score=None, dedupe=None,
                                          prefer_multimodal=False)]
    assert got == ["copy-of-query", "best-text", "near-dup-text"]
    everything = bank.search(embedding=q, k=50, max_score=None, dedupe=None)
    assert len(everything) == len(docs)
    scores = [d.score for d in everything]
    assert scores == sorted(scores, reverse=True)
    ref = {n: float(e @ q) for n, (e, _) in docs.items()}
    for d in everything:
        assert d.score == pytest.approx(ref[d.source], abs=1e-6)
    bank.close()
