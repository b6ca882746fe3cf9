"""Smoke test of tools/train/build_banks.py (step 5) on a tiny dataset.

Checks the shipped bank against the inputs (captions, codes, embeddings recomputed here
from the CLIP's text and image towers) and the training retrieval lists against a numpy
brute-force search with the selection rules written out in this file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TRAIN_DIR = Path(__file__).resolve().parents[1] / "tools" / "train"
sys.path.insert(0, str(TRAIN_DIR))

import build_banks
import encode_images
import make_dataset
import train_clip
import train_tokenizer
import train_vqgan

N = 40  # --quick: the first 40 records of each split


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pytest.importorskip("open_clip")
    pytest.importorskip("faiss")
    root = tmp_path_factory.mktemp("banks")
    data = root / "shapes"
    make_dataset.make_dataset(make_dataset.DatasetOptions(data, seed=5, train=N, bank=N,
                                                          eval=2))
    assert train_tokenizer.main(["--data", str(data), "--out", str(root / "tok"),
                                 "--quick"]) == 0
    assert train_vqgan.main(["--out", str(root / "vq"), "--quick"]) == 0
    assert encode_images.main(["--data", str(data), "--vqgan", str(root / "vq" / "vqgan"),
                               "--out", str(root / "codes"), "--quick"]) == 0
    assert train_clip.main(["--data", str(data), "--tokenizer", str(root / "tok"),
                            "--out", str(root / "clip"), "--quick"]) == 0
    args = ["--data", str(data), "--codes", str(root / "codes"), "--clip",
            str(root / "clip" / "clip"), "--vqgan", str(root / "vq" / "vqgan"), "--quick"]
    assert build_banks.main([*args, "--out", str(root / "out")]) == 0
    return root, args


def doc_embeddings(enc, data: Path, recs: list[dict]) -> np.ndarray:
    """(text + image) / 2 of the normalised embeddings, renormalised, in float64."""
    images = []
    for r in recs:
        with Image.open(data / r["image"]) as im:
            images.append(im.convert("RGB"))
    t = enc.encode_text([r["text"] for r in recs]).double().numpy()
    i = enc.encode_image(images).double().numpy()
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    i /= np.linalg.norm(i, axis=1, keepdims=True)
    d = t + i
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def test_shipped_bank_holds_the_bank_split(built):
    from cm3rt.retrieval.bank import MemoryBank
    from cm3rt.retrieval.clip import ClipEncoder
    from cm3rt.tokenizer import ImageTokenizer

    root, _ = built
    data = root / "shapes"
    enc = ClipEncoder(f"local-dir:{root / 'clip' / 'clip'}")
    tok = ImageTokenizer.from_pretrained(root / "vq" / "vqgan")
    recs = [json.loads(line) for line in (data / "bank.jsonl").open()][:N]
    codes = np.load(root / "codes" / "bank_codes.npy")
    with MemoryBank.open(root / "out" / "bank", encoder=enc, image_tokenizer=tok) as bank:
        assert len(bank) == N
        docs = bank.get(list(range(N)))
        assert [d.caption for d in docs] == [r["text"] for r in recs]
        assert [d.source for d in docs] == [r["image"] for r in recs]
        assert all(d.modality == "image+text" for d in docs)
        assert np.array_equal(np.stack([d.codes.numpy() for d in docs]), codes.astype(np.int64))
        stored, _ = bank.store.embeddings_of(list(range(N)))
        want = doc_embeddings(enc, data, recs)
        np.testing.assert_allclose(stored, want, atol=1e-5)
        # search by a stored document's own embedding finds it first (max_score off)
        hit = bank.search(embedding=want[7].astype(np.float32), k=1, max_score=None)
        assert hit[0].id == 7


def test_drop_words():
    rng = np.random.default_rng(0)
    text = "a small red star at the top and a blue circle"
    out = build_banks.drop_words(text, 0.2, rng)
    words, kept = text.split(), out.split()
    assert len(kept) == len(words) - 2  # round(0.2 * 10)
    it = iter(words)
    assert all(w in it for w in kept)  # an order-preserving subsequence
    assert build_banks.drop_words("circle", 0.2, rng) == "circle"
    a = build_banks.drop_words(text, 0.2, np.random.default_rng([0, 7, 3]))
    assert a == build_banks.drop_words(text, 0.2, np.random.default_rng([0, 7, 3]))


def test_train_retrieval_lists_match_brute_force(built):
    from cm3rt.retrieval.clip import ClipEncoder

    root, _ = built
    data = root / "shapes"
    lists = np.load(root / "out" / "train_retrieval.npy")
    assert lists.dtype == np.int32 and lists.shape == (N, 2)
    enc = ClipEncoder(f"local-dir:{root / 'clip' / 'clip'}")
    recs = [json.loads(line) for line in (data / "train.jsonl").open()][:N]
    docs = doc_embeddings(enc, data, recs)
    queries = [build_banks.drop_words(r["text"], 0.2,
                                      np.random.default_rng([0, build_banks.QUERY_TAG, i]))
               for i, r in enumerate(recs)]
    q = enc.encode_text(queries).double().numpy()
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    scores = q @ docs.T
    want = np.full((N, 2), -1)
    for i in range(N):
        order = [j for j in np.argsort(-scores[i], kind="stable") if j != i][:8]
        chosen: list[int] = []
        for j in order:  # all image+text: score order; drop > 0.9 and near-duplicates
            if scores[i, j] > 0.9:
                continue
            if any(docs[j] @ docs[c] > 0.95 for c in chosen):
                continue
            chosen.append(j)
            if len(chosen) == 2:
                break
        want[i, :len(chosen)] = chosen
    assert np.array_equal(lists, want)
    assert not any(i in lists[i] for i in range(N))
    summary = json.loads((root / "out" / "build_banks.json").read_text())
    assert summary["train_retrieval"]["records"] == N and summary["bank"]["documents"] == N


def test_same_seed_same_lists_other_seed_other_queries(built, tmp_path):
    root, args = built
    assert build_banks.main([*args, "--out", str(tmp_path / "again")]) == 0
    assert np.array_equal(np.load(tmp_path / "again" / "train_retrieval.npy"),
                          np.load(root / "out" / "train_retrieval.npy"))
    q0 = [build_banks.drop_words("a small red star at the top and a blue circle", 0.2,
                                 np.random.default_rng([s, build_banks.QUERY_TAG, 0]))
          for s in range(6)]
    assert len(set(q0)) > 1  # the seed drives the dropout
