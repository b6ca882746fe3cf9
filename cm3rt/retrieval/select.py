"""Document selection rules of RA-CM3 / CM3Leon retrieval (docs/DESIGN.md, "Retrieval").

From the top-M candidates of a dense search:
  1. drop candidates scoring above ``max_score`` (too close to the query: training-set
     copies of the prompt teach the model to copy; at inference, where the closest document
     is the most useful, a request may turn the rule off);
  2. walk the rest in preference order (image+text documents first when
     ``prefer_multimodal``, then by score) and drop a candidate whose cosine similarity
     to a document already chosen exceeds ``dedupe`` (near-duplicates waste context);
  3. stop after ``k`` documents.
The result is returned best score first. Fewer than ``k`` come back when fewer survive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# RA-CM3's rule against candidates too close to the query (a training-set copy of the
# target teaches the model to copy it). At inference a bank built to hold what the model
# never saw (the embedded model's held-out concepts) wants it off: a request's
# ``max_doc_score`` (defaults.json ``max_doc_score``) sets it.
DEFAULT_MAX_SCORE = 0.9

MULTIMODAL = "image+text"
MODALITIES = ("text", "image", MULTIMODAL)


@dataclass(frozen=True)
class SelectionParams:
    """Parameters of :func:`select_documents` (``None`` turns a rule off)."""

    k: int = 2
    max_score: float | None = DEFAULT_MAX_SCORE
    dedupe: float | None = 0.95
    prefer_multimodal: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k: expected an int >= 1, got {self.k!r}")
        for name in ("max_score", "dedupe"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and -1.0 <= value):
                raise ValueError(f"{name}: expected None or a float >= -1, got {value!r}")


def select_documents(
    scores: Sequence[float] | np.ndarray,
    embeddings: np.ndarray,
    modalities: Sequence[str],
    params: SelectionParams,
) -> list[int]:
    """Choose documents among ranked candidates; returns candidate positions, best first.

    Args:
        scores: [M] similarity of each candidate to the query.
        embeddings: [M, E] L2-normalised candidate embeddings (for the near-duplicate rule).
        modalities: [M] each "text", "image" or "image+text".
        params: the rules' parameters.
    """
    scores = np.asarray(scores, dtype=np.float64)
    embeddings = np.asarray(embeddings)
    m = scores.shape[0]
    if scores.ndim != 1:
        raise ValueError(f"scores: expected a 1-D array, got shape {scores.shape}")
    if embeddings.ndim != 2 or embeddings.shape[0] != m:
        raise ValueError(f"embeddings: expected shape [{m}, E], got {embeddings.shape}")
    if len(modalities) != m:
        raise ValueError(f"modalities: expected {m} entries, got {len(modalities)}")
    for i, modality in enumerate(modalities):
        if modality not in MODALITIES:
            raise ValueError(f"modalities[{i}]: expected one of {MODALITIES}, got {modality!r}")

    keep = np.arange(m)
    if params.max_score is not None:
        keep = keep[scores[keep] <= params.max_score]
    # Stable sort: by score descending, multimodal first when preferred.
    order = sorted(
        keep.tolist(),
        key=lambda i: (
            params.prefer_multimodal and modalities[i] != MULTIMODAL,
            -scores[i],
            i,
        ),
    )
    chosen: list[int] = []
    chosen_emb = np.empty((0, embeddings.shape[1]), dtype=np.float64)
    for i in order:
        if len(chosen) == params.k:
            break
        e = embeddings[i].astype(np.float64)
        if params.dedupe is not None and chosen and float(np.max(chosen_emb @ e)) > params.dedupe:
            continue
        chosen.append(i)
        chosen_emb = np.vstack([chosen_emb, e[None]])
    chosen.sort(key=lambda i: (-scores[i], i))
    return chosen
