"""An IVF bank of 100k documents keeps recall@10 >= 0.95 against the flat (exact) bank."""

from __future__ import annotations

import numpy as np
import pytest
from retrieval_fixtures import clustered_embeddings, unit

from cm3rt.retrieval.bank import DocInput, MemoryBank
from cm3rt.retrieval.clip import EncoderIdentity


@pytest.fixture(autouse=True)
def _two_faiss_threads():
    import faiss

    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(2)
    yield
    faiss.omp_set_num_threads(old)


def test_ivf_recall_at_10_against_flat(tmp_path) -> None:
    import faiss

    rng = np.random.default_rng(0)
    n, dim, k = 100_000, 64, 10
    # CLIP embeddings cluster by topic; uniformly random unit vectors (no structure at all)
    # are the one distribution no inverted-list index is built for.
    docs = clustered_embeddings(rng, n, dim)
    queries = unit(docs[rng.integers(0, n, 200)] + 0.08 * rng.standard_normal((200, dim)))
    # (noise of norm 0.64 around a document, as between documents of one topic)
    ident = EncoderIdentity(arch="synthetic", embed_dim=dim, digest="s" * 64)
    bank = MemoryBank.create(tmp_path / "ivf", ident, index="ivf")
    for start in range(0, n, 25_000):
        stop = start + 25_000
        bank.add_documents([DocInput(f"d{i}", caption="x") for i in range(start, stop)],
                           docs[start:stop])
    bank.flush()
    bank.close()
    bank = MemoryBank.open(tmp_path / "ivf")

    ivf = faiss.extract_index_ivf(bank._index)
    assert ivf.nlist > 100 and ivf.ntotal == n  # a real inverted-list index, not a flat one
    # Flat search is exact: numpy brute force in float64 (the flat bank equals it, see
    # test_retrieval_bank.py).
    exact = np.argsort(-(queries.astype(np.float64) @ docs.astype(np.float64).T), axis=1)[:, :k]
    off = {"k": k, "max_score": None, "dedupe": None, "prefer_multimodal": False}
    approx = bank.search_embeddings(queries, **off)
    recall = np.mean([len({d.id for d in a} & set(e.tolist())) / k
                      for a, e in zip(approx, exact)])
    assert recall >= 0.95, recall
    # Probing every list is exact.
    full = bank.search_embeddings(queries[:20], nprobe=ivf.nlist, **off)
    assert [[d.id for d in r] for r in full] == exact[:20].tolist()
    bank.close()
