"""The bank's SQLite document table: the source of truth the FAISS index is derived from.

Row ids are dense (0..n-1) and equal the FAISS row ids, so an index can always be rebuilt
or caught up from the stored embeddings.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (
    id INTEGER PRIMARY KEY,                  -- the FAISS row id
    source TEXT NOT NULL UNIQUE,             -- stable key of the source document
    modality TEXT NOT NULL CHECK (modality IN ('text', 'image', 'image+text')),
    caption TEXT,
    codes BLOB,                              -- the image's VQ codes (manifest codes_dtype)
    embedding BLOB NOT NULL                  -- float32 [E], L2-normalised
);
"""
_CHUNK = 900  # stays under SQLite's bound-parameter limit on old builds


@dataclass(frozen=True)
class StoredDoc:
    """One row of the document table."""

    id: int
    source: str
    modality: str
    caption: str | None
    codes: bytes | None


class DocStore:
    """Thin, thread-safe wrapper over the documents database."""

    def __init__(self, path: Path, embed_dim: int, writable: bool, create: bool = False) -> None:
        self.path = Path(path)
        self.embed_dim = embed_dim
        if not create and not self.path.is_file():
            raise FileNotFoundError(f"path: memory bank database {self.path} is missing")
        mode = "rwc" if create else ("rw" if writable else "ro")
        try:
            self.conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode={mode}", uri=True,
                                        check_same_thread=False, isolation_level=None)
            if create:
                self.conn.executescript(_SCHEMA)
            self.conn.execute("SELECT id, source, modality, caption, codes, embedding "
                              "FROM docs LIMIT 1").fetchall()
        except sqlite3.DatabaseError as e:
            raise ValueError(f"path: {self.path} is not a memory bank database: {e}") from e
        self._lock = threading.Lock()

    def close(self) -> None:
        self.conn.close()

    def count(self) -> int:
        with self._lock:
            n, top = self.conn.execute("SELECT COUNT(*), COALESCE(MAX(id) + 1, 0) "
                                       "FROM docs").fetchone()
        if n != top:
            raise ValueError(f"path: {self.path} is inconsistent: {n} documents but ids up to "
                             f"{top - 1} (expected dense ids)")
        return n

    def existing_sources(self, keys: Iterable[str]) -> set[str]:
        keys = list(keys)
        found: set[str] = set()
        with self._lock:
            for i in range(0, len(keys), _CHUNK):
                part = keys[i:i + _CHUNK]
                q = f"SELECT source FROM docs WHERE source IN ({','.join('?' * len(part))})"
                found.update(r[0] for r in self.conn.execute(q, part))
        return found

    def insert(self, rows: Sequence[tuple[str, str, str | None, bytes | None]],
               embeddings: np.ndarray) -> None:
        """Append documents (source, modality, caption, codes) in one transaction."""
        emb = np.ascontiguousarray(embeddings, dtype="<f4")
        if emb.shape != (len(rows), self.embed_dim):
            raise ValueError(f"embeddings: expected shape [{len(rows)}, {self.embed_dim}], "
                             f"got {list(emb.shape)}")
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                start = self.conn.execute("SELECT COALESCE(MAX(id) + 1, 0) FROM docs").fetchone()[0]
                self.conn.executemany(
                    "INSERT INTO docs (id, source, modality, caption, codes, embedding) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    ((start + i, s, m, c, codes, emb[i].tobytes())
                     for i, (s, m, c, codes) in enumerate(rows)))
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def truncate(self, count: int) -> None:
        """Delete every document with id >= count (undo of a failed add), in one transaction."""
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("DELETE FROM docs WHERE id >= ?", (count,))
            self.conn.execute("COMMIT")

    def _decode_embeddings(self, blobs: Sequence[bytes]) -> np.ndarray:
        size = 4 * self.embed_dim
        bad = next((len(b) for b in blobs if len(b) != size), None)
        if bad is not None:
            raise ValueError(f"path: {self.path} holds an embedding of {bad} bytes, "
                             f"expected {size}")
        flat = np.frombuffer(b"".join(blobs), dtype="<f4")
        return flat.reshape(len(blobs), self.embed_dim).astype(np.float32)  # a writable copy

    def embedding_range(self, start: int, stop: int) -> np.ndarray:
        """Embeddings of ids start..stop-1, float32 [stop-start, E]."""
        with self._lock:
            blobs = [r[0] for r in self.conn.execute(
                "SELECT embedding FROM docs WHERE id >= ? AND id < ? ORDER BY id", (start, stop))]
        if len(blobs) != stop - start:
            raise ValueError(f"path: {self.path} lacks documents {start}..{stop - 1}")
        return self._decode_embeddings(blobs)

    def embeddings_of(self, ids: Sequence[int]) -> tuple[np.ndarray, list[str]]:
        """Embeddings [len(ids), E] and modalities of the given ids, in that order."""
        rows: dict[int, tuple[bytes, str]] = {}
        ids = [int(i) for i in ids]
        with self._lock:
            for i in range(0, len(ids), _CHUNK):
                part = ids[i:i + _CHUNK]
                q = f"SELECT id, embedding, modality FROM docs WHERE id IN ({','.join('?' * len(part))})"
                rows.update((r[0], (r[1], r[2])) for r in self.conn.execute(q, part))
        missing = [i for i in ids if i not in rows]
        if missing:
            raise ValueError(f"path: {self.path} lacks document id {missing[0]} that the index "
                             "returned (index and database disagree)")
        return (self._decode_embeddings([rows[i][0] for i in ids]), [rows[i][1] for i in ids])

    def fetch(self, ids: Sequence[int]) -> list[StoredDoc]:
        """Full rows of the given ids, in that order."""
        ids = [int(i) for i in ids]
        rows: dict[int, StoredDoc] = {}
        with self._lock:
            for i in range(0, len(ids), _CHUNK):
                part = ids[i:i + _CHUNK]
                q = ("SELECT id, source, modality, caption, codes FROM docs "
                     f"WHERE id IN ({','.join('?' * len(part))})")
                rows.update((r[0], StoredDoc(*r)) for r in self.conn.execute(q, part))
        missing = [i for i in ids if i not in rows]
        if missing:
            raise ValueError(f"path: {self.path} lacks document id {missing[0]}")
        return [rows[i] for i in ids]
