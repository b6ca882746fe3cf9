"""Chameleon's image vocabulary: the BPE tokens named ``IMGIMG...`` that stand for VQ codes.

Chameleon spells codebook index ``c`` as a vocabulary entry ``"IMGIMG" + s + "Z"`` where
``s`` is the decimal digits of ``c`` written with letters (``A`` = 0 ... ``J`` = 9), so code
``123`` is ``IMGIMGBCDZ``. The ids of these entries are wherever the tokenizer put them;
this module derives the code <-> id tables from a vocabulary (``name -> id``), the same
relation HF transformers' ``ChameleonImageVocabularyMapping`` defines.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IMAGE_TOKEN_PREFIX = "IMGIMG"
_LETTER_DIGITS = {chr(ord("A") + i): str(i) for i in range(10)}


def image_token_name(code: int) -> str:
    """Vocabulary name of VQ code ``code`` (e.g. 123 -> ``IMGIMGBCDZ``)."""
    if code < 0:
        raise ValueError(f"image code must be >= 0, got {code}")
    return IMAGE_TOKEN_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def parse_image_token_name(name: str) -> int | None:
    """The VQ code an ``IMGIMG...`` name stands for, or None if ``name`` is not one."""
    if not name.startswith(IMAGE_TOKEN_PREFIX) or len(name) < len(IMAGE_TOKEN_PREFIX) + 2:
        return None
    body = name[len(IMAGE_TOKEN_PREFIX):-1]  # the last character is a terminator ('Z')
    digits = [_LETTER_DIGITS.get(c) for c in body]
    if any(d is None for d in digits):
        return None
    return int("".join(digits))


@dataclass(frozen=True)
class ImageVocabulary:
    """Bidirectional map between VQ codes ``0..K-1`` and vocabulary ids.

    Attributes:
        code_to_id_table: int64 ``[K]``, the vocabulary id of each code (index = code).
        id_to_code_table: int64 ``[V]``, the code of each vocabulary id, -1 for non-image ids.
    """

    code_to_id_table: torch.Tensor
    id_to_code_table: torch.Tensor

    @classmethod
    def from_vocab(cls, vocab: dict[str, int], vocab_size: int | None = None) -> ImageVocabulary:
        """Build the tables from a ``name -> id`` vocabulary (tokenizer or config map).

        Raises ValueError when the image names do not cover exactly the codes ``0..K-1``
        once each (a gap or a duplicate would make some code unrepresentable).
        """
        codes: dict[int, int] = {}
        for name, tok_id in vocab.items():
            code = parse_image_token_name(name)
            if code is None:
                continue
            if code in codes:
                raise ValueError(
                    f"vocabulary: image code {code} is spelled twice "
                    f"(ids {codes[code]} and {tok_id})"
                )
            codes[code] = int(tok_id)
        k = len(codes)
        if k and (min(codes) != 0 or max(codes) != k - 1):
            missing = sorted(set(range(max(codes) + 1)) - set(codes))[:5]
            raise ValueError(
                f"vocabulary: image codes must be 0..{k - 1} without gaps, "
                f"got {k} codes up to {max(codes)} (missing e.g. {missing})"
            )
        max_id = max(vocab.values(), default=-1)
        size = max(max_id + 1, vocab_size or 0)
        code_to_id = torch.tensor([codes[c] for c in range(k)], dtype=torch.int64)
        id_to_code = torch.full((size,), -1, dtype=torch.int64)
        if k:
            id_to_code[code_to_id] = torch.arange(k, dtype=torch.int64)
        return cls(code_to_id, id_to_code)

    @property
    def num_codes(self) -> int:
        """Number of codes the vocabulary spells (the VQ codebook size it serves)."""
        return int(self.code_to_id_table.shape[0])

    def code_to_id(self, codes: torch.Tensor) -> torch.Tensor:
        """Vocabulary ids of VQ codes (any shape, int64 out, on the codes' device)."""
        codes = torch.as_tensor(codes)
        if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"argument 'codes' must be an integer tensor, got {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_codes):
            raise ValueError(
                f"argument 'codes' must lie in [0, {self.num_codes}), got values in "
                f"[{int(codes.min())}, {int(codes.max())}]"
            )
        table = self.code_to_id_table.to(codes.device)
        return table[codes.long()]

    def id_to_code(self, ids: torch.Tensor) -> torch.Tensor:
        """VQ codes of vocabulary ids (any shape); raises ValueError for a non-image id."""
        ids = torch.as_tensor(ids)
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"argument 'ids' must be an integer tensor, got {ids.dtype}")
        size = self.id_to_code_table.shape[0]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size):
            raise ValueError(
                f"argument 'ids' must lie in [0, {size}), got values in "
                f"[{int(ids.min())}, {int(ids.max())}]"
            )
        codes = self.id_to_code_table.to(ids.device)[ids.long()]
        if codes.numel() and int(codes.min()) < 0:
            bad = ids.reshape(-1)[(codes.reshape(-1) < 0).nonzero()[0]].item()
            raise ValueError(f"argument 'ids' holds {bad}, which is not an image token id")
        return codes

    def is_image_id(self, ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask: which ids are image tokens (ids outside the table are not)."""
        ids = torch.as_tensor(ids).long()
        table = self.id_to_code_table.to(ids.device)
        inside = (ids >= 0) & (ids < table.shape[0])
        return inside & (table[ids.clamp(0, table.shape[0] - 1)] >= 0)
