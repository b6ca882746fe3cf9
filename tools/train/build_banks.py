#!/usr/bin/env python3
"""Step 5: the shipped memory bank and the decoder's training retrieval lists.

    python tools/train/build_banks.py --data data/shapes --codes data/runs/codes \\
        --clip data/runs/clip/clip --vqgan data/runs/vqgan/vqgan --out data/runs/banks

Two outputs, because held-out colour x shape pairs must never reach the decoder's training
data while the shipped bank must hold them (tools/train/README.md, step 5):

- ``<out>/bank/``: a ``cm3rt.retrieval.MemoryBank`` of the *bank* split. Each document is
  the record's ``text``, its VQ codes (row of ``bank_codes.npy``) and the CLIP document
  embedding (normalised text and image embeddings averaged, renormalised: docs/DESIGN.md
  "Retrieval"); flat inner-product FAISS index. The manifest records the CLIP and VQGAN
  identities, so a bank is refused with another encoder or image tokenizer.
- ``<out>/train_retrieval.npy``: int32 [N_train, 2], for each *train* record the indices of
  the train records to put in its context (-1 where fewer survive the rules). The query is
  the record's caption with query dropout (``--query-dropout`` of its words dropped, seeded
  per record), searched over the train documents' embeddings (FAISS flat IP), top
  ``--candidates`` beyond the record itself, which is dropped; then cm3rt's selection rules
  (``cm3rt.retrieval.select``: max_score, near-duplicates, image+text first) keep ``--k``.

Also writes ``<out>/build_banks.json`` (options, counts, identities, wall times). Seeded:
the same inputs and seed give the same lists and the same bank contents.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from train_common import REPO, Timer, progress, split_records  # noqa: F401  (REPO: sys.path)

from cm3rt.retrieval.bank import DocInput, MemoryBank
from cm3rt.retrieval.clip import ClipEncoder, combine_embeddings
from cm3rt.retrieval.select import MULTIMODAL, SelectionParams, select_documents
from cm3rt.tokenizer.vqgan import ImageTokenizer

QUERY_TAG = 7  # seed stream of the query dropout (train_common.step_rng style)


@dataclass
class BankOptions:
    """Inputs and knobs of :func:`build` (defaults: the plan's values)."""

    data: Path
    codes: Path
    clip: Path
    vqgan: Path
    out: Path
    seed: int = 0
    k: int = 2
    candidates: int = 8  # top-M, after the record itself is removed
    max_score: float = 0.9
    dedupe: float = 0.95
    query_dropout: float = 0.2
    batch: int = 256
    limit: int | None = None  # first N records of each split (--quick)


def drop_words(text: str, rate: float, rng: np.random.Generator) -> str:
    """``text`` with round(rate * words) words removed at random (at least one kept)."""
    words = text.split()
    n_drop = min(len(words) - 1, round(rate * len(words)))
    if n_drop <= 0:
        return text
    gone = set(rng.choice(len(words), size=n_drop, replace=False).tolist())
    return " ".join(w for i, w in enumerate(words) if i not in gone)


def embed_texts(encoder: ClipEncoder, texts: list[str], batch: int, desc: str,
                quiet: bool) -> np.ndarray:
    """L2-normalised text embeddings float32 [N, E], ``batch`` at a time."""
    out = [np.zeros((0, encoder.embed_dim), np.float32)]
    for b in progress(0, (len(texts) + batch - 1) // batch, desc, quiet):
        out.append(encoder.encode_text(texts[b * batch:(b + 1) * batch]).numpy())
    return np.concatenate(out)


def embed_documents(encoder: ClipEncoder, data: Path, recs: list[dict], batch: int, desc: str,
                    quiet: bool) -> np.ndarray:
    """Document embeddings (record ``text`` + PNG) float32 [N, E], ``batch`` at a time."""
    out = [np.zeros((0, encoder.embed_dim), np.float32)]
    for b in progress(0, (len(recs) + batch - 1) // batch, desc, quiet):
        part = recs[b * batch:(b + 1) * batch]
        images = []
        for r in part:
            with Image.open(data / r["image"]) as im:
                images.append(im.convert("RGB"))
        t = encoder.encode_text([r["text"] for r in part])
        i = encoder.encode_image(images)
        out.append(combine_embeddings(t, i).numpy())
    return np.concatenate(out)


def load_codes(codes_dir: Path, split: str, n: int, tok: ImageTokenizer) -> np.ndarray:
    """``<split>_codes.npy`` checked against the VQGAN (identity in codes.json, shape)."""
    meta_file = codes_dir / "codes.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"--codes: {meta_file} is missing (run encode_images.py)")
    meta = json.loads(meta_file.read_text())
    if meta.get("identity") != tok.identity():
        raise ValueError(f"--codes: {codes_dir} holds codes of VQGAN {meta.get('identity')!r:.14}"
                         f", but --vqgan is {tok.identity()[:12]}; rerun encode_images.py")
    codes = np.load(codes_dir / f"{split}_codes.npy", allow_pickle=False)
    if codes.ndim != 2 or codes.shape[0] < n or codes.shape[1] != tok.num_tokens:
        raise ValueError(f"--codes: {split}_codes.npy has shape {list(codes.shape)}, expected "
                         f"[>= {n}, {tok.num_tokens}]")
    return codes[:n]


def build_shipped_bank(opts: BankOptions, encoder: ClipEncoder, tok: ImageTokenizer,
                       quiet: bool) -> dict:
    """The MemoryBank of the bank split in ``<out>/bank`` (rebuilt from scratch)."""
    recs = split_records(opts.data, "bank", opts.limit)
    codes = load_codes(opts.codes, "bank", len(recs), tok)
    emb = embed_documents(encoder, opts.data, recs, opts.batch, "embed bank", quiet)
    path = opts.out / "bank"
    if path.exists():
        shutil.rmtree(path)
    bank = MemoryBank.create(path, encoder, tok, index="flat")
    try:
        for lo in range(0, len(recs), 1000):  # one transaction per 1,000 documents
            hi = min(len(recs), lo + 1000)
            docs = [DocInput(source=r["image"], caption=r["text"], codes=codes[j])
                    for j, r in zip(range(lo, hi), recs[lo:hi])]
            bank.add_documents(docs, emb[lo:hi])
        bank.flush()
        count = len(bank)
    finally:
        bank.close()
    return {"documents": count, "path": str(path)}


def retrieval_lists(opts: BankOptions, encoder: ClipEncoder, quiet: bool
                    ) -> tuple[np.ndarray, dict]:
    """int32 [N_train, k] retrieval lists of the train split (-1 = no document)."""
    import faiss

    recs = split_records(opts.data, "train", opts.limit)
    docs = embed_documents(encoder, opts.data, recs, opts.batch, "embed train docs", quiet)
    queries = [drop_words(r["text"], opts.query_dropout,
                          np.random.default_rng([opts.seed, QUERY_TAG, i]))
               for i, r in enumerate(recs)]
    q = embed_texts(encoder, queries, opts.batch, "embed train queries", quiet)
    index = faiss.IndexFlatIP(docs.shape[1])
    index.add(np.ascontiguousarray(docs, dtype=np.float32))
    # One more than M: the record itself is (nearly always) among the hits and is dropped.
    scores, ids = index.search(np.ascontiguousarray(q, dtype=np.float32),
                               min(opts.candidates + 1, len(recs)))
    params = SelectionParams(k=opts.k, max_score=opts.max_score, dedupe=opts.dedupe,
                             prefer_multimodal=True)
    lists = np.full((len(recs), opts.k), -1, dtype=np.int32)
    for i in range(len(recs)):
        hit = [(int(j), float(s)) for j, s in zip(ids[i], scores[i]) if j >= 0 and j != i]
        hit = hit[:opts.candidates]
        if not hit:
            continue
        cand = np.array([j for j, _ in hit])
        chosen = select_documents([s for _, s in hit], docs[cand], [MULTIMODAL] * len(hit),
                                  params)
        lists[i, :len(chosen)] = cand[chosen]
    got = (lists >= 0).sum(axis=1)
    stats = {"records": len(recs), **{f"with_{n}_docs": int((got == n).sum())
                                      for n in range(opts.k + 1)},
             "mean_top_score": float(scores[:, 0].mean()) if len(recs) else 0.0}
    np.save(opts.out / "train_doc_embeddings.npy", docs.astype(np.float16))
    return lists, stats


def build(opts: BankOptions, quiet: bool = False) -> dict:
    """Both outputs; returns the summary written to ``<out>/build_banks.json``."""
    timer = Timer("build_banks")
    opts.out.mkdir(parents=True, exist_ok=True)
    encoder = ClipEncoder(f"local-dir:{opts.clip}", batch_size=opts.batch)
    tok = ImageTokenizer.from_pretrained(opts.vqgan)
    summary: dict = {"options": {k: str(v) if isinstance(v, Path) else v
                                 for k, v in asdict(opts).items()},
                     "clip": encoder.identity.to_dict(), "vqgan_identity": tok.identity()}
    t0 = timer.seconds()
    summary["bank"] = build_shipped_bank(opts, encoder, tok, quiet)
    summary["bank"]["wall_s"] = round(timer.seconds() - t0, 1)
    print(f"shipped bank: {summary['bank']['documents']} documents -> {opts.out / 'bank'} "
          f"({summary['bank']['wall_s']} s)", flush=True)
    t0 = timer.seconds()
    lists, stats = retrieval_lists(opts, encoder, quiet)
    np.save(opts.out / "train_retrieval.npy", lists)
    summary["train_retrieval"] = {**stats, "wall_s": round(timer.seconds() - t0, 1)}
    print(f"train retrieval: {stats['records']} records, "
          + ", ".join(f"{n} docs: {stats[f'with_{n}_docs']}" for n in range(opts.k + 1))
          + f" -> {opts.out / 'train_retrieval.npy'} ({summary['train_retrieval']['wall_s']} s)",
          flush=True)
    summary["wall_s"] = round(timer.seconds(), 1)
    (opts.out / "build_banks.json").write_text(json.dumps(summary, indent=1) + "\n")
    timer.report()
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/shapes"))
    p.add_argument("--codes", type=Path, default=Path("data/runs/codes"))
    p.add_argument("--clip", type=Path, default=Path("data/runs/clip/clip"),
                   help="open_clip local-dir export (train_clip.py)")
    p.add_argument("--vqgan", type=Path, default=Path("data/runs/vqgan/vqgan"))
    p.add_argument("--out", type=Path, default=Path("data/runs/banks"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=2, help="documents per training example")
    p.add_argument("--candidates", type=int, default=8, help="top-M before the rules")
    p.add_argument("--max-score", type=float, default=0.9)
    p.add_argument("--dedupe", type=float, default=0.95)
    p.add_argument("--query-dropout", type=float, default=0.2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="first 40 records of each split")
    a = p.parse_args(argv)
    if a.k < 1 or a.candidates < a.k:
        p.error(f"expected 1 <= --k <= --candidates, got --k {a.k} --candidates {a.candidates}")
    if not 0.0 <= a.query_dropout < 1.0:
        p.error(f"--query-dropout must be in [0, 1), got {a.query_dropout}")
    if a.batch < 1:
        p.error(f"--batch must be >= 1, got {a.batch}")
    torch.manual_seed(a.seed)
    torch.set_num_threads(max(1, a.threads))
    build(BankOptions(a.data, a.codes, a.clip, a.vqgan, a.out, seed=a.seed, k=a.k,
                      candidates=a.candidates, max_score=a.max_score, dedupe=a.dedupe,
                      query_dropout=a.query_dropout, batch=a.batch,
                      limit=40 if a.quick else None), quiet=a.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
