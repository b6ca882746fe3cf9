"""MemoryBank: a directory with a FAISS index, a SQLite document table and a manifest.

Layout of a bank directory:
    manifest.json   encoder + image tokenizer identities, index spec (written once)
    docs.sqlite     documents: source key, modality, caption, VQ codes, embedding
    index.faiss     inner-product index over the embeddings (row id = document id)

The database is the source of truth: documents are committed one transaction per batch,
and the index is derived from their stored embeddings and replaced atomically at the end
of an add. An add that raises deletes what it committed, so the bank is left as it was; a
build that is killed keeps its committed batches, and running it again resumes (documents
are keyed by their source, and the index catches up from the database).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import faiss_index as fi
from .clip import ClipEncoder, EncoderIdentity
from .manifest import DATABASE, INDEX, MANIFEST, Manifest, TokenizerIdentity
from .select import DEFAULT_MAX_SCORE, MULTIMODAL, SelectionParams, select_documents
from .sources import SourceDoc, check_image, load_image, read_source
from .store import DocStore

_ADD_CHUNK = 65_536  # vectors per index.add when the index catches up with the database


@dataclass
class Document:
    """A retrieved (or stored) document."""

    id: int
    source: str
    modality: str  # "text", "image" or "image+text"
    caption: str | None
    codes: torch.Tensor | None  # int64 [num_tokens] VQ codes of the image
    score: float | None = None  # cosine similarity to the query


@dataclass
class DocInput:
    """A document to store: caption and/or VQ codes, keyed by a unique source string."""

    source: str
    caption: str | None = None
    codes: torch.Tensor | np.ndarray | None = None

    @property
    def modality(self) -> str:
        if self.caption is not None and self.codes is not None:
            return MULTIMODAL
        return "image" if self.codes is not None else "text"


def _identity_of(encoder: ClipEncoder | EncoderIdentity) -> EncoderIdentity:
    if isinstance(encoder, EncoderIdentity):
        return encoder
    identity = getattr(encoder, "identity", None)
    if not isinstance(identity, EncoderIdentity):
        raise TypeError(f"encoder: expected a ClipEncoder or EncoderIdentity, got "
                        f"{type(encoder).__name__}")
    return identity


class MemoryBank:
    """A retrieval memory bank. Make one with :meth:`create`, :meth:`build` or :meth:`open`."""

    def __init__(self, path: Path, manifest: Manifest, store: DocStore, *, writable: bool,
                 encoder: ClipEncoder | None, image_tokenizer: Any, device: str) -> None:
        self.path = path
        self.manifest = manifest
        self.store = store
        self.writable = writable
        self.encoder = encoder
        self.image_tokenizer = image_tokenizer
        self.device = str(device)
        self._index = None  # CPU index, the one written to disk
        self._search_index = None  # the CPU index or its GPU copy
        self._gpu_resources = None

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, path: str | Path, encoder: ClipEncoder | EncoderIdentity,
               image_tokenizer: Any = None, index: str = "flat",
               nprobe: int | None = None) -> MemoryBank:
        """Create an empty bank in ``path`` (a new or empty directory)."""
        path = Path(path)
        identity = _identity_of(encoder)
        fi.check_spec(index, identity.embed_dim)
        if nprobe is not None and (isinstance(nprobe, bool) or not isinstance(nprobe, int)
                                   or nprobe < 1):
            raise ValueError(f"nprobe: expected None or an int >= 1, got {nprobe!r}")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ValueError(f"out: expected a new or empty directory, got {path} (not empty)")
        tok = None if image_tokenizer is None else TokenizerIdentity.of(image_tokenizer)
        manifest = Manifest(encoder=identity, image_tokenizer=tok, index=index, nprobe=nprobe)
        path.mkdir(parents=True, exist_ok=True)
        store = DocStore(path / DATABASE, identity.embed_dim, writable=True, create=True)
        manifest.write(path)  # last: a directory with a manifest is a complete empty bank
        return cls(path, manifest, store, writable=True,
                   encoder=encoder if isinstance(encoder, ClipEncoder) else None,
                   image_tokenizer=image_tokenizer, device="cpu")

    @classmethod
    def open(cls, path: str | Path, encoder: ClipEncoder | EncoderIdentity | None = None,
             image_tokenizer: Any = None, device: str = "cpu",
             writable: bool = False) -> MemoryBank:
        """Open a bank; a given encoder / image tokenizer must be the bank's own.

        Read-only by default (nothing on disk changes). ``device="cuda"`` searches on the GPU
        when faiss has GPU support. Without ``encoder``, text/image searches load the encoder
        the manifest names (from its recorded local files).
        """
        path = Path(path)
        manifest = Manifest.read(path)
        if encoder is not None:
            manifest.check_encoder(_identity_of(encoder), path)
        if image_tokenizer is not None:
            manifest.check_tokenizer(TokenizerIdentity.of(image_tokenizer), path)
        store = DocStore(path / DATABASE, manifest.embed_dim, writable=writable)
        bank = cls(path, manifest, store, writable=writable,
                   encoder=encoder if isinstance(encoder, ClipEncoder) else None,
                   image_tokenizer=image_tokenizer, device=device)
        try:
            bank._load_index(missing_ok=writable)
            bank._sync_index()  # catch up with documents committed after the last index write
        except BaseException:
            store.close()
            raise
        return bank

    @classmethod
    def build(cls, source: str | Path, out: str | Path, encoder: ClipEncoder,
              image_tokenizer: Any = None, index: str = "flat", batch_size: int = 64,
              progress: bool = True) -> MemoryBank:
        """Build (or resume building) a bank in ``out`` from a folder or JSONL ``source``."""
        out = Path(out)
        if not isinstance(encoder, ClipEncoder):
            raise TypeError(f"encoder: expected a ClipEncoder, got {type(encoder).__name__}")
        new_dir = not out.exists()
        if out.is_dir() and any(out.iterdir()):
            bank = cls.open(out, encoder, image_tokenizer, writable=True)
            created = False
            if bank.manifest.index != index:
                bank.close()
                raise ValueError(f"index: the bank at {out} uses index {bank.manifest.index!r}, "
                                 f"got {index!r}")
        else:
            bank = cls.create(out, encoder, image_tokenizer, index=index)
            created = True
        try:
            bank.add(source, batch_size=batch_size, progress=progress)
        except Exception:
            bank.close()
            if created:  # a failed first build leaves no empty bank behind
                for name in (MANIFEST, DATABASE, DATABASE + "-journal", INDEX):
                    (out / name).unlink(missing_ok=True)
                if new_dir and not any(out.iterdir()):
                    out.rmdir()
            raise
        except BaseException:
            bank.close()  # interrupted: committed batches stay, a rerun resumes
            raise
        return bank

    @classmethod
    def rebuild_index(cls, path: str | Path) -> None:
        """Rebuild ``index.faiss`` from the database (e.g. after the file was damaged)."""
        path = Path(path)
        manifest = Manifest.read(path)
        store = DocStore(path / DATABASE, manifest.embed_dim, writable=False)
        bank = cls(path, manifest, store, writable=True, encoder=None, image_tokenizer=None,
                   device="cpu")
        try:
            bank._sync_index()
            bank._write_index()
        finally:
            bank.close()

    def close(self) -> None:
        """Release the database connection and the index."""
        self.store.close()
        self._index = self._search_index = self._gpu_resources = None

    def __enter__(self):  # -> Self
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.store.count()

    # ------------------------------------------------------------------ index upkeep
    def _load_index(self, missing_ok: bool) -> None:
        index_path = self.path / INDEX
        n = self.store.count()
        self._index = None
        if index_path.is_file():
            index = fi.read_index(index_path, self.manifest.embed_dim)
            if index.ntotal > n:
                raise ValueError(f"path: index file {index_path} holds {index.ntotal} vectors but "
                                 f"the database only {n} documents (files from different banks?)")
            fi.set_default_nprobe(index, self.manifest.nprobe)
            self._index = index
        elif n > 0 and not missing_ok:
            raise FileNotFoundError(f"path: index file {index_path} is missing; resume the build "
                                    "or call MemoryBank.rebuild_index(path)")
        self._search_index = self._index

    def _sync_index(self) -> None:
        """Bring the in-memory index up to the database (train it first if it needs to)."""
        n = self.store.count()
        if self._index is None:
            if n == 0:
                return
            factory = fi.resolve_factory(self.manifest.index, n)
            index = fi.new_index(factory, self.manifest.embed_dim)
            if not index.is_trained:
                size = fi.train_sample_size(factory, n)
                ids = np.sort(np.random.default_rng(0).choice(n, size=size, replace=False))
                sample, _ = self.store.embeddings_of(ids.tolist())
                try:
                    index.train(sample)
                except RuntimeError as e:
                    raise ValueError(f"index: FAISS could not train {factory!r} on {size} "
                                     f"documents: {str(e).strip().splitlines()[-1]}") from None
            fi.set_default_nprobe(index, self.manifest.nprobe)
            self._index = index
        for start in range(self._index.ntotal, n, _ADD_CHUNK):
            self._index.add(self.store.embedding_range(start, min(n, start + _ADD_CHUNK)))
        self._search_index, self._gpu_resources = fi.to_search_device(self._index, self.device)

    def _write_index(self) -> None:
        if self._index is not None:
            fi.write_index_atomic(self._index, self.path / INDEX)

    def flush(self) -> None:
        """Index every stored document and write the index file atomically."""
        self._require_writable("flush")
        self._sync_index()
        self._write_index()

    def _require_writable(self, what: str) -> None:
        if not self.writable:
            raise ValueError(f"{what}: the bank at {self.path} is open read-only "
                             "(open it with writable=True)")

    # ------------------------------------------------------------------ adding
    def add_documents(self, docs: Sequence[DocInput], embeddings: np.ndarray | torch.Tensor,
                      ) -> None:
        """Store documents with precomputed embeddings [N, E] in one transaction.

        The index is brought up to date by :meth:`flush` (``add`` does it for you).
        """
        self._require_writable("add_documents")
        emb = (embeddings.detach().cpu().numpy() if isinstance(embeddings, torch.Tensor)
               else np.asarray(embeddings))
        if emb.ndim != 2 or emb.shape != (len(docs), self.manifest.embed_dim):
            raise ValueError(f"embeddings: expected shape [{len(docs)}, "
                             f"{self.manifest.embed_dim}], got {list(emb.shape)}")
        if not np.isfinite(emb).all():
            raise ValueError("embeddings: expected finite values, got NaN or inf")
        tok = self.manifest.image_tokenizer
        rows = []
        for i, d in enumerate(docs):
            if not isinstance(d, DocInput):
                raise TypeError(f"docs[{i}]: expected DocInput, got {type(d).__name__}")
            if not isinstance(d.source, str) or not d.source:
                raise ValueError(f"docs[{i}].source: expected a non-empty str, got {d.source!r}")
            blob = None
            if d.codes is not None:
                if tok is None:
                    raise ValueError(f"docs[{i}].codes: the bank at {self.path} was created "
                                     "without an image tokenizer, so it cannot hold images")
                codes = np.asarray(d.codes.cpu() if isinstance(d.codes, torch.Tensor) else d.codes)
                if codes.shape != (tok.num_tokens,) or codes.dtype.kind not in "iu":
                    raise ValueError(f"docs[{i}].codes: expected {tok.num_tokens} integer codes, "
                                     f"got shape {list(codes.shape)} dtype {codes.dtype}")
                if codes.size and (codes.min() < 0 or codes.max() >= tok.codebook_size):
                    raise ValueError(f"docs[{i}].codes: expected codes in [0, "
                                     f"{tok.codebook_size}), got [{codes.min()}, {codes.max()}]")
                blob = codes.astype(tok.codes_dtype).tobytes()
            if d.caption is None and blob is None:
                raise ValueError(f"docs[{i}]: expected a caption or codes, got neither")
            rows.append((d.source, d.modality, d.caption, blob))
        self.store.insert(rows, emb.astype(np.float32))

    def add(self, source: str | Path, batch_size: int = 64, progress: bool = True) -> int:
        """Embed, VQ-encode and store the documents of ``source`` not yet in the bank.

        Returns how many documents were added. On an error nothing of this call remains.
        """
        from tqdm.auto import tqdm

        self._require_writable("add")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        if self.encoder is None:
            raise ValueError("encoder: add needs the bank's ClipEncoder; pass it to open()")
        docs = read_source(source)
        present = self.store.existing_sources(d.key for d in docs)
        todo = [d for d in docs if d.key not in present]
        with_images = [d for d in todo if d.image is not None]
        if with_images:
            if self.manifest.image_tokenizer is None:
                raise ValueError(f"source: {source} has images but the bank at {self.path} was "
                                 "created without an image tokenizer")
            if self.image_tokenizer is None:
                raise ValueError("image_tokenizer: the source has images; pass the bank's "
                                 "image tokenizer")
            for d in with_images:  # every image readable before anything is written
                check_image(d.image)
        start = self.store.count()
        try:
            with tqdm(total=len(todo), desc="bank add", unit="doc", disable=not progress) as bar:
                for b in range(0, len(todo), batch_size):
                    batch = todo[b:b + batch_size]
                    self._add_batch(batch)
                    bar.update(len(batch))
            self._sync_index()
            self._write_index()
        except Exception:
            self.store.truncate(start)  # leave the bank as it was
            self._load_index(missing_ok=True)
            self._sync_index()
            raise
        return len(todo)

    def _add_batch(self, batch: Sequence[SourceDoc]) -> None:
        images = [load_image(d.image) if d.image is not None else None for d in batch]
        emb = self.encoder.encode_documents([d.caption for d in batch], images)
        present = [im for im in images if im is not None]
        codes_iter = iter(())
        if present:
            codes = self.image_tokenizer.encode(present)
            shape = (len(present), self.manifest.image_tokenizer.num_tokens)
            if not isinstance(codes, torch.Tensor) or tuple(codes.shape) != shape:
                raise ValueError(f"image_tokenizer: encode returned "
                                 f"{getattr(codes, 'shape', type(codes))}, expected {list(shape)}")
            codes_iter = iter(codes)
        inputs = [DocInput(d.key, d.caption, next(codes_iter) if d.image is not None else None)
                  for d in batch]
        self.add_documents(inputs, emb)

    # ------------------------------------------------------------------ searching
    def _query_encoder(self) -> ClipEncoder:
        if self.encoder is None:
            ident = self.manifest.encoder
            try:
                # for_queries: a text query then needs no open_clip import (fast start)
                encoder = ClipEncoder.for_queries(ident.arch, weights=ident.weights,
                                                  device=self.device)
            except (FileNotFoundError, ValueError) as e:
                raise ValueError(f"encoder: the bank at {self.path} was opened without an "
                                 f"encoder and the recorded one ({ident.arch}, {ident.weights}) "
                                 f"cannot be loaded: {e}; pass encoder= to open()") from e
            self.manifest.check_encoder(encoder.identity, self.path)
            self.encoder = encoder
        return self.encoder

    def score_captions(self, image: Image.Image, texts: Sequence[str]) -> list[float]:
        """Cosine similarity of each of ``texts`` with ``image`` under the bank's own CLIP
        (the retriever ranks candidate captions: ``Request.doc_sweep``)."""
        return self._query_encoder().score_texts(image, texts)

    def search(self, text: str | None = None,
               image: Image.Image | Sequence[Image.Image] | None = None, k: int = 2,
               candidates: int | None = None, max_score: float | None = DEFAULT_MAX_SCORE,
               dedupe: float | None = 0.95, prefer_multimodal: bool = True,
               embedding: np.ndarray | torch.Tensor | None = None,
               nprobe: int | None = None) -> list[Document]:
        """Retrieve up to ``k`` documents for a text and/or image query (or an embedding).

        Follows the selection rules of :mod:`cm3rt.retrieval.select` on the top
        ``candidates`` (default max(8k, 32)) of the index. Best score first.
        """
        if embedding is None:
            if text is not None and not isinstance(text, str):
                raise TypeError(f"text: expected str or None, got {type(text).__name__}")
            images = [image] if isinstance(image, Image.Image) else list(image or [])
            if not text and not images:
                raise ValueError("search: expected text, image or embedding, got none")
            embedding = self._query_encoder().encode_query(text, images)
        q = (embedding.detach().cpu().numpy() if isinstance(embedding, torch.Tensor)
             else np.asarray(embedding, dtype=np.float32))
        if q.shape != (self.manifest.embed_dim,):
            raise ValueError(f"embedding: expected shape [{self.manifest.embed_dim}], got "
                             f"{list(q.shape)}")
        return self.search_embeddings(q[None], k=k, candidates=candidates, max_score=max_score,
                                      dedupe=dedupe, prefer_multimodal=prefer_multimodal,
                                      nprobe=nprobe)[0]

    def search_embeddings(self, queries: np.ndarray | torch.Tensor, k: int = 2,
                          candidates: int | None = None,
                          max_score: float | None = DEFAULT_MAX_SCORE,
                          dedupe: float | None = 0.95, prefer_multimodal: bool = True,
                          nprobe: int | None = None) -> list[list[Document]]:
        """Batched :meth:`search` on query embeddings [Q, E] (normalised here)."""
        params = SelectionParams(k=k, max_score=max_score, dedupe=dedupe,
                                 prefer_multimodal=prefer_multimodal)
        if candidates is None:
            candidates = max(8 * k, 32)
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < k:
            raise ValueError(f"candidates: expected an int >= k ({k}), got {candidates!r}")
        q = (queries.detach().cpu().numpy() if isinstance(queries, torch.Tensor)
             else np.asarray(queries))
        if q.ndim != 2 or q.shape[1] != self.manifest.embed_dim:
            raise ValueError(f"queries: expected shape [Q, {self.manifest.embed_dim}], got "
                             f"{list(q.shape)}")
        q = q.astype(np.float32)
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        if not np.isfinite(q).all() or (norms == 0).any():
            raise ValueError("queries: expected finite, non-zero embeddings")
        q = np.ascontiguousarray(q / norms)
        index = self._search_index
        if index is None or index.ntotal == 0:
            return [[] for _ in range(len(q))]
        scores, ids = index.search(q, min(candidates, index.ntotal),
                                   **fi.search_params(index, nprobe))
        wanted = sorted({int(i) for i in ids.ravel() if i >= 0})
        emb, mods = self.store.embeddings_of(wanted)
        row = {doc_id: j for j, doc_id in enumerate(wanted)}
        picks: list[list[tuple[int, float]]] = []
        for qs, qi in zip(scores, ids):
            valid = qi >= 0
            cand = [row[int(i)] for i in qi[valid]]
            chosen = select_documents(qs[valid], emb[cand], [mods[j] for j in cand], params)
            picks.append([(int(qi[valid][c]), float(qs[valid][c])) for c in chosen])
        stored = {d.id: d for d in self.store.fetch(sorted({i for p in picks for i, _ in p}))}
        return [[self._document(stored[i], s) for i, s in p] for p in picks]

    def _document(self, row, score: float | None) -> Document:
        codes = None
        if row.codes is not None:
            dtype = self.manifest.image_tokenizer.codes_dtype
            codes = torch.from_numpy(np.frombuffer(row.codes, dtype=dtype).astype(np.int64))
        return Document(id=row.id, source=row.source, modality=row.modality,
                        caption=row.caption, codes=codes, score=score)

    def get(self, ids: Sequence[int]) -> list[Document]:
        """Stored documents by id (no score)."""
        return [self._document(r, None) for r in self.store.fetch(ids)]


_OPEN_LOCK = threading.Lock()
_OPEN_BANKS: dict[tuple, MemoryBank] = {}


def open_cached(path: str | Path, *, device: str = "cpu",
                query_encoder: str | None = None) -> MemoryBank:
    """Open a bank read-only once per process and reuse it (the one bank cache).

    ``query_encoder``: a CLIP spec (e.g. ``"local-dir:DIR"``) whose text tower encodes the
    queries, instead of the encoder the manifest names (it must be the bank's own; the
    embedded default bank passes its own ``clip/`` so it never depends on where it was
    built). A bank rewritten on disk since it was opened is opened again.
    """
    path = Path(path).expanduser().resolve()
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"argument 'bank' must be a memory bank directory (with "
                                f"{MANIFEST}), got {str(path)!r}")
    stamps = tuple((path / f).stat().st_mtime_ns if (path / f).exists() else 0
                   for f in (DATABASE, INDEX))
    where = (str(path), str(device), query_encoder)
    with _OPEN_LOCK:
        bank = _OPEN_BANKS.get(where + stamps)
        if bank is None:
            for old in [k for k in _OPEN_BANKS if k[:3] == where]:
                _OPEN_BANKS.pop(old).close()
            encoder = ClipEncoder.for_queries(query_encoder) if query_encoder else None
            bank = _OPEN_BANKS[where + stamps] = MemoryBank.open(path, encoder=encoder,
                                                                 device=device)
        return bank
