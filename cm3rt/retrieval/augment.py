"""Retrieval-augmented prompts: retrieved documents laid out in front of the prompt.

Each chosen document enters the context as ``caption <boi> image tokens <eoi>`` (a
text-only document as its caption, an image-only one as its image span), best score first,
before the prompt (docs/DESIGN.md, "Retrieval"). Only whole documents are placed: a document
that does not fit the token budget is skipped (never half an image).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from cm3rt.tokenizer.processor import Processor

from .bank import Document, MemoryBank, open_cached
from .manifest import TokenizerIdentity
from .select import DEFAULT_MAX_SCORE


def retrieve_prefix(bank: MemoryBank | str | Path, text: str | None,
                    images: Sequence[Image.Image] | None, k: int, max_tokens: int,
                    processor: Processor, *, max_score: float | None = DEFAULT_MAX_SCORE,
                    dedupe: float | None = 0.95, prefer_multimodal: bool = True,
                    candidates: int | None = None) -> tuple[list[int], list[Document]]:
    """Search ``bank`` for the prompt and lay the chosen documents out as token ids.

    Args:
        bank: a MemoryBank or the path of one (opened once and cached).
        text, images: the prompt's text and images (the query).
        k: how many documents to retrieve (0: none).
        max_tokens: budget for the prefix; as many whole documents as fit, best first.
        processor: the model's Processor (its text tokenizer maps codes to vocab ids).
        max_score, dedupe, prefer_multimodal, candidates: selection rules, as in
            :meth:`MemoryBank.search`.

    Returns:
        (prefix token ids, the documents placed, in order).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k: expected an int >= 0, got {k!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"max_tokens: expected an int >= 0, got {max_tokens!r}")
    if not isinstance(processor, Processor):
        raise TypeError(f"processor: expected a cm3rt Processor, got {type(processor).__name__}")
    if k == 0 or max_tokens == 0:
        return [], []
    if isinstance(bank, (str, Path)):
        bank = open_cached(bank)
    elif not isinstance(bank, MemoryBank):
        raise TypeError(f"bank: expected a MemoryBank or a path, got {type(bank).__name__}")
    if bank.manifest.image_tokenizer is not None:
        bank.manifest.check_tokenizer(TokenizerIdentity.of(processor.image), bank.path)
    docs = bank.search(text=text or None, image=list(images or []), k=k, candidates=candidates,
                       max_score=max_score, dedupe=dedupe, prefer_multimodal=prefer_multimodal)
    prefix: list[int] = []
    placed: list[Document] = []
    for doc in docs:
        ids = processor.document_ids(doc.caption, doc.codes)
        if len(prefix) + len(ids) <= max_tokens:
            prefix += ids
            placed.append(doc)
    return prefix, placed
