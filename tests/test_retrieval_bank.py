"""MemoryBank: exact search, build -> open -> search round trips, resumable and atomic adds,
and clear errors for mismatched encoders, damaged files and unreadable sources."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from retrieval_fixtures import GridTokenizer, make_tiny_clip, random_image, unit

from cm3rt.retrieval.bank import DocInput, MemoryBank
from cm3rt.retrieval.clip import ClipEncoder, EncoderIdentity


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    d = tmp_path_factory.mktemp("clip")
    return {"a": make_tiny_clip(d, seed=0), "b": make_tiny_clip(d, seed=1)}


@pytest.fixture(scope="module")
def encoder(clip_files) -> ClipEncoder:
    cfg, w = clip_files["a"]
    return ClipEncoder(str(cfg), weights=w, batch_size=4)


@pytest.fixture
def folder(tmp_path) -> Path:
    """6 image+text docs, 2 image-only docs, 2 text-only docs."""
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    captions = ["a red circle", "a blue square", "two green triangles", "a yellow star",
                "a purple hexagon", "an orange cross"]
    for i, cap in enumerate(captions):
        random_image(rng).save(src / f"img{i}.png")
        (src / f"img{i}.txt").write_text(cap + "\n")
    random_image(rng).save(src / "sub" / "lonely.png")
    random_image(rng).convert("RGBA").save(src / "sub" / "alpha.png")
    (src / "note1.txt").write_text("a story about shapes")
    (src / "sub" / "note2.txt").write_text("grey clouds over a field")
    return src


def files_digest(bank_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(bank_dir.iterdir()) if p.is_file()}


def bank_content(bank_dir: Path) -> list[tuple]:
    with MemoryBank.open(bank_dir) as bank:
        return [(d.id, d.source, d.caption) for d in bank.get(range(len(bank)))]


# ---------------------------------------------------------------------------- exact search
def test_flat_search_equals_numpy_brute_force(tmp_path) -> None:
    rng = np.random.default_rng(0)
    n, dim, k = 20_000, 64, 10
    docs = unit(rng.standard_normal((n, dim)))
    ident = EncoderIdentity(arch="synthetic", embed_dim=dim, digest="s" * 64)
    bank = MemoryBank.create(tmp_path / "bank", ident, index="flat")
    for start in range(0, n, 5000):  # several transactions, one index at the end
        bank.add_documents([DocInput(f"d{i}", caption=f"doc {i}")
                            for i in range(start, start + 5000)], docs[start:start + 5000])
    bank.flush()
    bank.close()

    queries = rng.standard_normal((25, dim))
    with MemoryBank.open(tmp_path / "bank") as bank:
        got = bank.search_embeddings(queries, k=k, max_score=None, dedupe=None,
                                     prefer_multimodal=False)
    ref_scores = unit(queries).astype(np.float64) @ docs.astype(np.float64).T
    for qi, found in enumerate(got):
        order = np.argsort(-ref_scores[qi], kind="stable")[:k]
        assert [d.id for d in found] == order.tolist()
        np.testing.assert_allclose([d.score for d in found], ref_scores[qi, order], atol=2e-6)
        assert [d.caption for d in found] == [f"doc {i}" for i in order]


# ---------------------------------------------------------------------------- round trip
def test_build_open_search_round_trip(tmp_path, folder, encoder) -> None:
    tok = GridTokenizer()
    with MemoryBank.build(folder, tmp_path / "bank", encoder, tok, batch_size=3,
                          progress=False) as bank:
        assert len(bank) == 10

    with MemoryBank.open(tmp_path / "bank", encoder=encoder, image_tokenizer=tok) as bank:
        docs = {d.source: d for d in bank.get(range(len(bank)))}
        assert {s: d.modality for s, d in docs.items()} == {
            **{f"img{i}.png": "image+text" for i in range(6)},
            "sub/lonely.png": "image", "sub/alpha.png": "image",
            "note1.txt": "text", "sub/note2.txt": "text"}
        assert docs["img0.png"].caption == "a red circle"
        assert docs["sub/note2.txt"].caption == "grey clouds over a field"
        # Codes are the tokenizer's codes of the file, stored once at build time.
        for src in ("img3.png", "sub/alpha.png"):
            from PIL import Image
            with Image.open(folder / src) as im:
                want = tok.encode([im.copy()])[0]
            assert torch.equal(docs[src].codes, want)
        assert docs["note1.txt"].codes is None

        # Stored embeddings follow docs/DESIGN.md: mean of normalised text and image, renormalised.
        emb, _ = bank.store.embeddings_of([docs["img2.png"].id, docs["note1.txt"].id,
                                           docs["sub/lonely.png"].id])
        from PIL import Image
        with Image.open(folder / "img2.png") as im:
            i2 = encoder.encode_image([im.copy()])[0].double()
        with Image.open(folder / "sub/lonely.png") as im:
            il = encoder.encode_image([im.copy()])[0].double()
        t2, tn = encoder.encode_text(["two green triangles", "a story about shapes"]).double()
        want = [(t2 / t2.norm() + i2 / i2.norm()), tn, il]
        want = torch.stack([w / w.norm() for w in want]).numpy()
        np.testing.assert_allclose(emb, want, atol=1e-5)

        # A text query: scores are cosine similarities with the stored embeddings.
        q = encoder.encode_text(["a yellow star"])[0].double().numpy()
        found = bank.search(text="a yellow star", k=20, max_score=None, dedupe=None,
                            prefer_multimodal=False)
        assert len(found) == 10  # k larger than the bank: every document, once
        all_emb, _ = bank.store.embeddings_of([d.id for d in found])
        np.testing.assert_allclose([d.score for d in found], all_emb @ q, atol=1e-5)
        assert [d.score for d in found] == sorted((d.score for d in found), reverse=True)
        # Default rules: k docs, image+text first.
        two = bank.search(text="a yellow star", k=2, max_score=None)
        assert len(two) == 2 and all(d.modality == "image+text" for d in two)

    # Without an encoder, the bank reloads the one its manifest records.
    with MemoryBank.open(tmp_path / "bank") as bank:
        again = bank.search(text="a yellow star", k=20, max_score=None, dedupe=None,
                            prefer_multimodal=False)
        assert [(d.id, round(d.score, 5)) for d in again] == [
            (d.id, round(d.score, 5)) for d in found]


def test_jsonl_source_and_errors(tmp_path, encoder) -> None:
    rng = np.random.default_rng(2)
    (tmp_path / "imgs").mkdir()
    random_image(rng).save(tmp_path / "imgs" / "a.png")
    random_image(rng).save(tmp_path / "imgs" / "b.jpg")
    rows = [{"image": "imgs/a.png", "text": "a cat"}, {"text": "only words"},
            {"image": str(tmp_path / "imgs" / "b.jpg")}, {"image": "imgs/a.png", "text": "dup"}]
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    with MemoryBank.build(src, tmp_path / "bank", encoder, GridTokenizer(),
                          progress=False) as bank:
        got = [(d.source, d.modality, d.caption) for d in bank.get(range(len(bank)))]
    assert got == [("docs.jsonl#1", "image+text", "a cat"), ("docs.jsonl#2", "text", "only words"),
                   ("docs.jsonl#3", "image", None), ("docs.jsonl#4", "image+text", "dup")]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": ""}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2.*neither"):
        MemoryBank.build(bad, tmp_path / "bank2", encoder, progress=False)
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not valid JSON"):
        MemoryBank.build(bad, tmp_path / "bank3", encoder, progress=False)
    with pytest.raises(FileNotFoundError, match="source"):
        MemoryBank.build(tmp_path / "nope.jsonl", tmp_path / "bank4", encoder, progress=False)
    # Images without an image tokenizer cannot be stored.
    with pytest.raises(ValueError, match="without an image tokenizer"):
        MemoryBank.build(src, tmp_path / "bank5", encoder, progress=False)


# ---------------------------------------------------------------------------- refusals
def test_mismatched_encoder_or_tokenizer_refused(tmp_path, folder, encoder, clip_files) -> None:
    MemoryBank.build(folder, tmp_path / "bank", encoder, GridTokenizer(), progress=False).close()
    cfg, w = clip_files["b"]
    other = ClipEncoder(str(cfg), weights=w)
    before = files_digest(tmp_path / "bank")
    with pytest.raises(ValueError, match="built with encoder"):
        MemoryBank.open(tmp_path / "bank", encoder=other)
    with pytest.raises(ValueError, match="built with encoder"):
        MemoryBank.build(folder, tmp_path / "bank", other, GridTokenizer(), progress=False)
    with pytest.raises(ValueError, match="image tokenizer"):
        MemoryBank.open(tmp_path / "bank", image_tokenizer=GridTokenizer(tag="v2"))
    with pytest.raises(ValueError, match="image tokenizer"):
        MemoryBank.open(tmp_path / "bank", image_tokenizer=GridTokenizer(side=8))
    with pytest.raises(ValueError, match="index"):
        MemoryBank.build(folder, tmp_path / "bank", encoder, GridTokenizer(), index="ivf",
                         progress=False)
    assert files_digest(tmp_path / "bank") == before
    # Query embeddings of another dimension are refused too.
    with MemoryBank.open(tmp_path / "bank") as bank:
        with pytest.raises(ValueError, match="embedding"):
            bank.search(embedding=np.ones(16, dtype=np.float32))
        with pytest.raises(ValueError, match="read-only"):
            bank.add(folder)


def test_truncated_index_missing_database_unreadable_image(tmp_path, folder, encoder) -> None:
    bank_dir = tmp_path / "bank"
    MemoryBank.build(folder, bank_dir, encoder, GridTokenizer(), progress=False).close()
    content = bank_content(bank_dir)
    index = bank_dir / "index.faiss"
    full = index.read_bytes()

    index.write_bytes(full[: len(full) // 2])
    before = files_digest(bank_dir)
    with pytest.raises(ValueError, match=r"index.faiss is unreadable"):
        MemoryBank.open(bank_dir)
    with pytest.raises(ValueError, match=r"index.faiss is unreadable"):
        MemoryBank.open(bank_dir, writable=True)
    assert files_digest(bank_dir) == before
    MemoryBank.rebuild_index(bank_dir)  # the database is the source of truth
    assert index.read_bytes() == full
    assert bank_content(bank_dir) == content

    (bank_dir / "docs.sqlite").rename(tmp_path / "moved.sqlite")
    with pytest.raises(FileNotFoundError, match="docs.sqlite is missing"):
        MemoryBank.open(bank_dir)
    assert not (bank_dir / "docs.sqlite").exists()  # opening did not create an empty one
    (tmp_path / "moved.sqlite").rename(bank_dir / "docs.sqlite")
    with pytest.raises(FileNotFoundError, match="not a memory bank"):
        MemoryBank.open(tmp_path)

    # An unreadable image anywhere in the source: a clear error before anything is written.
    rng = np.random.default_rng(5)
    for i in range(3):
        random_image(rng).save(folder / f"new{i}.png")
    (folder / "new1.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    before = files_digest(bank_dir)
    with pytest.raises(ValueError, match=r"new1.png is not a readable image"):
        MemoryBank.build(folder, bank_dir, encoder, GridTokenizer(), progress=False)
    assert files_digest(bank_dir) == before
    assert bank_content(bank_dir) == content


class FailingTokenizer(GridTokenizer):
    """Fails on its n-th encode call, like a decoder error deep in a large build."""

    def __init__(self, fail_on: int) -> None:
        super().__init__()
        self.fail_on = fail_on

    def encode(self, images):
        if self.calls + 1 == self.fail_on:
            self.calls += 1
            raise RuntimeError("simulated failure in batch")
        return super().encode(images)


def test_failed_add_leaves_bank_unchanged_then_resumes(tmp_path, folder, encoder) -> None:
    bank_dir = tmp_path / "bank"
    first = sorted(folder.glob("img[0-2].*"))
    part = tmp_path / "part"
    part.mkdir()
    for p in first:
        (part / p.name).write_bytes(p.read_bytes())
    MemoryBank.build(part, bank_dir, encoder, GridTokenizer(), progress=False).close()
    content, index_bytes = bank_content(bank_dir), (bank_dir / "index.faiss").read_bytes()
    assert len(content) == 3

    with pytest.raises(RuntimeError, match="simulated failure"):
        MemoryBank.build(folder, bank_dir, encoder, FailingTokenizer(fail_on=2), batch_size=2,
                         progress=False)
    assert bank_content(bank_dir) == content
    assert (bank_dir / "index.faiss").read_bytes() == index_bytes

    # Resuming adds only what is missing.
    tok = GridTokenizer()
    with MemoryBank.build(folder, bank_dir, encoder, tok, batch_size=2, progress=False) as bank:
        assert len(bank) == 10
        assert bank.add(folder, progress=False) == 0
    assert bank_content(bank_dir)[:3] == content
    assert tok.calls == 3  # 3 new image docs in batches of 2 -> 2 calls, alpha+lonely -> 1


def test_documents_committed_but_not_indexed_are_searchable(tmp_path, encoder) -> None:
    # A build killed between a committed batch and the index write: the database is ahead.
    ident = encoder.identity
    bank = MemoryBank.create(tmp_path / "bank", ident)
    emb = encoder.encode_text(["alpha", "beta"]).numpy()
    bank.add_documents([DocInput("a", "alpha"), DocInput("b", "beta")], emb)
    bank.flush()
    bank.add_documents([DocInput("c", "gamma")], encoder.encode_text(["gamma"]).numpy())
    bank.close()  # no flush: index.faiss still holds 2 vectors
    with MemoryBank.open(tmp_path / "bank", encoder=encoder) as ro:
        assert len(ro) == 3
        top = ro.search(text="gamma", k=1, max_score=None)
        assert top[0].caption == "gamma" and top[0].score == pytest.approx(1.0, abs=1e-5)
