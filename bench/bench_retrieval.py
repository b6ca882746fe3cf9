"""Memory-bank benchmarks: build throughput, and search at 1M synthetic documents.

Run: python -m pytest bench/bench_retrieval.py -q -s
Sizes: CM3RT_BENCH_DOCS (default 1_000_000), CM3RT_BENCH_DIM (default 512, CLIP ViT-B),
CM3RT_BENCH_BUILD_DOCS (default 64 documents for the ViT-B-32 build; 8x that for the tiny
CLIP build, which shows the bank's own cost).

Prints, measured in the same run:
- build: documents/s of a full build (image + caption files -> CLIP -> VQ codes -> SQLite
  -> index) with a ViT-B-32-shaped CLIP (random weights: no downloads), and docs/s of
  storing + indexing precomputed embeddings at the 1M scale;
- search: latency p50 / p99 of one query and throughput of 64-query batches for FAISS
  flat, FAISS IVF and the whole bank.search pipeline (index + SQLite + selection rules),
  each against numpy brute force (one float32 GEMV/GEMM + argpartition); the flat scan's
  GB/s against the machine's copy bandwidth; IVF recall@10 against exact search.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _common import copy_bandwidth, record

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from retrieval_fixtures import GridTokenizer, clustered_embeddings, random_image

from cm3rt.retrieval.bank import DocInput, MemoryBank
from cm3rt.retrieval.clip import ClipEncoder, EncoderIdentity
from cm3rt.retrieval.manifest import DATABASE

N_DOCS = int(os.environ.get("CM3RT_BENCH_DOCS", "1000000"))
DIM = int(os.environ.get("CM3RT_BENCH_DIM", "512"))
BUILD_DOCS = int(os.environ.get("CM3RT_BENCH_BUILD_DOCS", "64"))
K = 10
BATCH = 64


def latencies(fn, queries: np.ndarray, budget_s: float = 6.0, min_reps: int = 10,
              max_reps: int = 200) -> list[float]:
    """Single-query latencies, distinct queries, for ~budget_s (at least min_reps)."""
    out: list[float] = []
    fn(queries[:1])  # warm-up
    start = time.perf_counter()
    while len(out) < min_reps or (time.perf_counter() - start < budget_s and len(out) < max_reps):
        i = len(out) % len(queries)
        t0 = time.perf_counter()
        fn(queries[i:i + 1])
        out.append(time.perf_counter() - t0)
    return out


def throughput(fn, queries: np.ndarray, rounds: int = 3) -> float:
    """Queries/s answering batches of BATCH queries."""
    fn(queries[:BATCH])
    t0 = time.perf_counter()
    for r in range(rounds):
        fn(queries[(r * BATCH) % len(queries):][:BATCH])
    return rounds * BATCH / (time.perf_counter() - t0)


def p(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


@pytest.fixture(scope="module")
def faiss_threads():
    # FAISS's OpenMP threads and OpenBLAS's own pool oversubscribe small shared machines
    # (FAISS wiki, "slow brute-force search with OpenBLAS"): one thread unless told otherwise.
    import faiss

    faiss.omp_set_num_threads(int(os.environ.get("CM3RT_BENCH_FAISS_THREADS", "1")))
    return faiss.omp_get_max_threads()


@pytest.fixture(scope="module")
def large(tmp_path_factory, faiss_threads):
    """N_DOCS clustered unit vectors stored in a flat and an IVF bank."""
    rng = np.random.default_rng(0)
    docs = clustered_embeddings(rng, N_DOCS, DIM, clusters=max(100, N_DOCS // 50))
    # queries near documents (noise of norm ~0.64, as between documents of one topic)
    queries = (docs[rng.integers(0, N_DOCS, 512)]
               + 0.64 / np.sqrt(DIM) * rng.standard_normal((512, DIM)))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    ident = EncoderIdentity(arch="synthetic", embed_dim=DIM, digest="b" * 64)
    root = tmp_path_factory.mktemp("bench_banks")
    t0 = time.perf_counter()
    bank = MemoryBank.create(root / "flat", ident, index="flat")
    chunk = 50_000
    for start in range(0, N_DOCS, chunk):
        stop = min(N_DOCS, start + chunk)
        bank.add_documents([DocInput(f"d{i}", caption=f"synthetic document {i}")
                            for i in range(start, stop)], docs[start:stop])
    t_store = time.perf_counter() - t0
    bank.flush()
    t_index = time.perf_counter() - t0 - t_store
    bank.close()
    # The IVF bank: same documents (database copied), index rebuilt from it.
    MemoryBank.create(root / "ivf", ident, index="ivf").close()
    shutil.copyfile(root / "flat" / DATABASE, root / "ivf" / DATABASE)
    t0 = time.perf_counter()
    MemoryBank.rebuild_index(root / "ivf")
    t_ivf = time.perf_counter() - t0
    record(bench="bank_store", docs=N_DOCS, dim=DIM,
           store_docs_per_s=round(N_DOCS / t_store), flat_index_s=round(t_index, 1),
           ivf_index_s=round(t_ivf, 1), build_docs_per_s_flat=round(N_DOCS / (t_store + t_index)),
           build_docs_per_s_ivf=round(N_DOCS / (t_store + t_ivf)))
    banks = {spec: MemoryBank.open(root / spec) for spec in ("flat", "ivf")}
    yield docs, queries, banks
    for b in banks.values():
        b.close()


def numpy_search(docs: np.ndarray):
    def run(q: np.ndarray):
        s = q @ docs.T
        top = np.argpartition(-s, K, axis=1)[:, :K]
        order = np.argsort(-np.take_along_axis(s, top, 1), axis=1)
        return np.take_along_axis(top, order, 1)
    return run


def test_search_1m(benchmark, large) -> None:
    docs, queries, banks = large
    np_fn = numpy_search(docs)
    np_lat = latencies(np_fn, queries)
    np_qps = throughput(np_fn, queries)
    exact = np_fn(queries[:200])
    bw = copy_bandwidth("cpu")
    scan_bytes = docs.nbytes
    record(bench="search", impl="numpy", docs=N_DOCS, dim=DIM,
           p50_ms=round(p(np_lat, 50) * 1e3, 2), p99_ms=round(p(np_lat, 99) * 1e3, 2),
           qps_batch64=round(np_qps, 1), scan_GBps=round(scan_bytes / p(np_lat, 50) / 1e9, 1),
           copy_GBps=round(bw / 1e9, 1))
    for spec, bank in banks.items():
        index = bank._search_index

        def raw(q, index=index):
            return index.search(q, K)

        lat = latencies(raw, queries)
        qps = throughput(raw, queries)
        _, got = index.search(queries[:200], K)
        recall = float(np.mean([len(set(a) & set(e)) / K for a, e in zip(got, exact)]))
        row = {"bench": "search", "impl": f"faiss_{spec}", "docs": N_DOCS, "dim": DIM,
               "p50_ms": round(p(lat, 50) * 1e3, 2), "p99_ms": round(p(lat, 99) * 1e3, 2),
               "qps_batch64": round(qps, 1), "vs_numpy_p50": round(p(np_lat, 50) / p(lat, 50), 2),
               "vs_numpy_qps": round(qps / np_qps, 2), "recall@10": round(recall, 4)}
        if spec == "flat":
            row["scan_GBps"] = round(scan_bytes / p(lat, 50) / 1e9, 1)
        record(**row)

        def full(q, bank=bank):
            return bank.search_embeddings(q, k=2)

        lat = latencies(full, queries)
        qps = throughput(full, queries)
        record(bench="search", impl=f"bank.search_{spec}", docs=N_DOCS, dim=DIM,
               p50_ms=round(p(lat, 50) * 1e3, 2), p99_ms=round(p(lat, 99) * 1e3, 2),
               qps_batch64=round(qps, 1), vs_numpy_p50=round(p(np_lat, 50) / p(lat, 50), 2),
               vs_numpy_qps=round(qps / np_qps, 2))
    benchmark.pedantic(lambda: banks["ivf"].search_embeddings(queries[:1], k=2), rounds=20,
                       iterations=1)


def _image_folder(path: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    path.mkdir()
    for i in range(n):
        random_image(rng, (256, 256)).save(path / f"{i:05d}.jpg", quality=90)
        (path / f"{i:05d}.txt").write_text(f"a photo of object number {i} on a table")
    return path


def _build_rate(name: str, encoder: ClipEncoder, src: Path, n: int, out: Path, benchmark=None
                ) -> None:
    from PIL import Image

    # The encoder alone on the same kind of documents: the share the bank adds on top.
    ims = [Image.open(f).convert("RGB") for f in sorted(src.glob("*.jpg"))[:32]]
    t0 = time.perf_counter()
    encoder.encode_documents([f"caption {i}" for i in range(len(ims))], ims)
    clip_rate = len(ims) / (time.perf_counter() - t0)
    times: list[float] = []

    def build():
        t0 = time.perf_counter()
        MemoryBank.build(src, out / f"bank{len(times)}", encoder, GridTokenizer(side=32),
                         batch_size=32, progress=False).close()
        times.append(time.perf_counter() - t0)

    if benchmark is not None:
        benchmark.pedantic(build, rounds=1, iterations=1)
    else:
        build()
    rate = n / statistics.median(times)
    record(bench="build", encoder=name, docs=n, docs_per_s=round(rate, 1),
           clip_only_docs_per_s=round(clip_rate, 1),
           bank_share_pct=round(100 * max(0.0, 1 - rate / clip_rate), 1))


def test_build_throughput(benchmark, tmp_path, faiss_threads) -> None:
    """Full builds from image + caption files (VQ codes by a stand-in tokenizer)."""
    import open_clip
    import torch
    from retrieval_fixtures import make_tiny_clip
    from safetensors.torch import save_file

    # ViT-B-32 shapes with random weights (no downloads): the encoder-bound case.
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32")
    weights = tmp_path / "vit-b-32-random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    del model
    src = _image_folder(tmp_path / "src", BUILD_DOCS)
    _build_rate("ViT-B-32(random)", ClipEncoder("ViT-B-32", weights=weights, batch_size=32),
                src, BUILD_DOCS, tmp_path, benchmark)
    # A tiny CLIP: what the bank itself (decode, VQ, SQLite, index) sustains.
    cfg, w = make_tiny_clip(tmp_path / "tiny")
    n = 8 * BUILD_DOCS
    src = _image_folder(tmp_path / "src_tiny", n)
    _build_rate("tiny-clip", ClipEncoder(str(cfg), weights=w, batch_size=32), src, n,
                tmp_path / "tiny_out")
