"""Retrieval-augmented prompts: retrieved documents laid out in front of the prompt.

Each chosen document enters the context as ``caption <boi> image tokens <eoi>`` (a
text-only document as its caption, an image-only one as its image span), best score first,
before the prompt (DESIGN.md, "Retrieval"). Only whole documents are placed: a document
that does not fit the token budget is skipped (never half an image).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .bank import Document, MemoryBank
from .manifest import DATABASE, INDEX, TokenizerIdentity

_CACHE_LOCK = threading.Lock()
_OPEN_BANKS: dict[tuple, MemoryBank] = {}  # cache of banks opened from a path


def open_cached(path: str | Path, device: str = "cpu") -> MemoryBank:
    """Open a bank once per (path, device, file versions); later calls reuse it."""
    path = Path(path).resolve()
    stamps = tuple((path / f).stat().st_mtime_ns if (path / f).exists() else 0
                   for f in (DATABASE, INDEX))
    key = (str(path), str(device), stamps)
    with _CACHE_LOCK:
        bank = _OPEN_BANKS.get(key)
        if bank is None:
            for old in [k for k in _OPEN_BANKS if k[:2] == key[:2]]:
                _OPEN_BANKS.pop(old).close()
            bank = _OPEN_BANKS[key] = MemoryBank.open(path, device=device)
        return bank


def _tokenizers(processor: Any) -> tuple[Any, Any]:
    """(text tokenizer, image tokenizer) of a Processor."""
    def find(names: tuple[str, ...], needs: tuple[str, ...]) -> Any:
        for name in names:
            tok = getattr(processor, name, None)
            if tok is not None and all(hasattr(tok, a) for a in needs):
                return tok
        return None

    # cm3rt.tokenizer.Processor keeps them as .text / .image
    text_tok = find(("text", "text_tokenizer", "tokenizer"),
                    ("encode", "code_to_id", "boi_id", "eoi_id"))
    image_tok = find(("image", "image_tokenizer"), ("identity", "num_tokens", "codebook_size"))
    if text_tok is None:
        raise TypeError(f"processor: expected a Processor with a text tokenizer (encode, "
                        f"code_to_id, boi_id, eoi_id), got {type(processor).__name__}")
    return text_tok, image_tok


def _text_ids(text_tok: Any, caption: str) -> list[int]:
    ids = [int(i) for i in text_tok.encode(caption)]
    # A tokenizer post-processor may wrap text in bos/eos; a doc is mid-sequence text.
    bos, eos = getattr(text_tok, "bos_id", None), getattr(text_tok, "eos_id", None)
    if ids and bos is not None and ids[0] == bos:
        ids = ids[1:]
    if ids and eos is not None and ids[-1] == eos:
        ids = ids[:-1]
    return ids


def document_ids(doc: Document, text_tok: Any) -> list[int]:
    """Token ids of one document: ``caption <boi> image tokens <eoi>``."""
    ids = _text_ids(text_tok, doc.caption) if doc.caption else []
    if doc.codes is not None:
        image = torch.as_tensor(text_tok.code_to_id(doc.codes)).reshape(-1).tolist()
        ids += [int(text_tok.boi_id), *map(int, image), int(text_tok.eoi_id)]
    return ids


def retrieve_prefix(bank: MemoryBank | str | Path, text: str | None,
                    images: Sequence[Image.Image] | None, k: int, max_tokens: int,
                    processor: Any, *, max_score: float | None = 0.9,
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
    text_tok, image_tok = _tokenizers(processor)
    if k == 0 or max_tokens == 0:
        return [], []
    if isinstance(bank, (str, Path)):
        bank = open_cached(bank)
    elif not isinstance(bank, MemoryBank):
        raise TypeError(f"bank: expected a MemoryBank or a path, got {type(bank).__name__}")
    if image_tok is not None and bank.manifest.image_tokenizer is not None:
        bank.manifest.check_tokenizer(TokenizerIdentity.of(image_tok), bank.path)
    docs = bank.search(text=text or None, image=list(images or []), k=k, candidates=candidates,
                       max_score=max_score, dedupe=dedupe, prefer_multimodal=prefer_multimodal)
    prefix: list[int] = []
    placed: list[Document] = []
    for doc in docs:
        ids = document_ids(doc, text_tok)
        if len(prefix) + len(ids) <= max_tokens:
            prefix += ids
            placed.append(doc)
    return prefix, placed
