"""TextTokenizer: an HF ``tokenizers`` BPE plus Chameleon's special and image tokens.

Special tokens are found by name in the vocabulary (``tokenizer_config.json`` /
``special_tokens_map.json`` next to ``tokenizer.json`` take precedence for bos/eos/pad):

=========  =========================================  ====================================
attribute  names tried                                 role
=========  =========================================  ====================================
bos_id     ``<s>``, ``<bos>``, ``<|begin_of_text|>``   start of a sequence
eos_id     ``</s>``, ``<eos>``, ``<|end_of_text|>``    end of a sequence
pad_id     ``<pad>`` (else eos)                        padding
boi_id     ``<racm3:break>``, ``<break>``              begin-image (CM3Leon's break)
eoi_id     ``<eoss>``                                  end-image
mask_id    ``<mask>`` (None if absent)                 CM3 infilling: the masked span
infill_id  ``<infill>`` (None if absent)               CM3 infilling: generate the span
=========  =========================================  ====================================
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer

from cm3rt.tokenizer.image_vocab import ImageVocabulary

TOKENIZER_FILE = "tokenizer.json"

BOS_NAMES = ("<s>", "<bos>", "<|begin_of_text|>")
EOS_NAMES = ("</s>", "<eos>", "<|end_of_text|>")
PAD_NAMES = ("<pad>",)
BOI_NAMES = ("<racm3:break>", "<break>")
EOI_NAMES = ("<eoss>",)
MASK_NAMES = ("<mask>",)
INFILL_NAMES = ("<infill>",)


def check_text(text: object, name: str) -> str:
    """``text`` if it is a str that can be encoded as UTF-8 (no lone surrogates, which
    Python strings may hold but no tokenizer can read); TypeError / ValueError naming
    argument ``name`` otherwise."""
    if not isinstance(text, str):
        raise TypeError(f"argument '{name}' must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"argument '{name}' is not valid Unicode text: {exc.reason} "
                         f"{text[exc.start:exc.end]!r} at index {exc.start}") from None
    return text


def _configured_specials(directory: Path) -> dict[str, str]:
    """bos/eos/pad token *names* from HF's tokenizer_config.json / special_tokens_map.json."""
    found: dict[str, str] = {}
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        f = directory / fname
        if not f.is_file():
            continue
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"TextTokenizer: {f} is not valid JSON: {exc}") from exc
        for role in ("bos", "eos", "pad"):
            v = d.get(f"{role}_token")
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str) and role not in found:
                found[role] = v
    return found


class TextTokenizer:
    """BPE text tokenizer with Chameleon's special and image tokens.

    Attributes:
        bos_id, eos_id, pad_id, boi_id, eoi_id: special token ids (always present).
        mask_id, infill_id: CM3 infilling tokens, None when the vocabulary lacks them.
        image_token_ids: int64 ``[K]``, vocab id of each VQ code (index = code).
        vocab_size: number of ids the tokenizer knows (added tokens included).
    """

    def __init__(self, tokenizer: Tokenizer, *, source: str = "<memory>",
                 special_names: dict[str, str] | None = None) -> None:
        """Wrap a ``tokenizers.Tokenizer``; ``special_names`` overrides bos/eos/pad names."""
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"argument 'tokenizer' must be a tokenizers.Tokenizer, got "
                            f"{type(tokenizer).__name__}")
        self._tok = tokenizer
        self.source = source
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(tokenizer.get_vocab_size(with_added_tokens=True),
                              max(vocab.values(), default=-1) + 1)
        names = special_names or {}

        def find(role: str, candidates: tuple[str, ...], required: bool) -> int | None:
            tried = ((names[role],) if role in names else ()) + candidates
            for name in tried:
                if name in vocab:
                    return vocab[name]
            if required:
                raise ValueError(f"TextTokenizer: {source} has no {role} token "
                                 f"(looked for {list(tried)})")
            return None

        self.bos_id: int = find("bos", BOS_NAMES, True)
        self.eos_id: int = find("eos", EOS_NAMES, True)
        pad = find("pad", PAD_NAMES, False)
        self.pad_id: int = self.eos_id if pad is None else pad
        self.boi_id: int = find("boi", BOI_NAMES, True)
        self.eoi_id: int = find("eoi", EOI_NAMES, True)
        self.mask_id: int | None = find("mask", MASK_NAMES, False)
        self.infill_id: int | None = find("infill", INFILL_NAMES, False)
        try:
            self.image_vocab = ImageVocabulary.from_vocab(vocab, self.vocab_size)
        except ValueError as exc:
            raise ValueError(f"TextTokenizer: {source}: {exc}") from exc

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_file(cls, path: str | Path) -> TextTokenizer:
        """Load ``tokenizer.json`` (a path to it, or the directory holding it)."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"TextTokenizer: no such file: {file} (argument 'path' "
                                    f"must be a {TOKENIZER_FILE} or a directory holding one)")
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises its own exception type
            raise ValueError(f"TextTokenizer: {file} is not a valid HF tokenizers file: "
                             f"{exc}") from exc
        return cls(tok, source=str(file), special_names=_configured_specials(file.parent))

    # ------------------------------------------------------------------ text
    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` (no bos/eos added)."""
        check_text(text, "text")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens (bos, eos, breaks ...) dropped by default."""
        ids = self.check_ids(ids)
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry, None if absent."""
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary entry of an id, None if out of range."""
        return self._tok.id_to_token(token_id)

    def check_ids(self, ids: Sequence[int] | torch.Tensor, name: str = "ids") -> list[int]:
        """``ids`` as a list of ints, each in ``[0, vocab_size)`` (else ValueError)."""
        if isinstance(ids, torch.Tensor):
            if ids.is_floating_point() or ids.dim() > 1:
                raise TypeError(f"argument '{name}' must be a 1-D integer sequence, got tensor "
                                f"{ids.dtype} {tuple(ids.shape)}")
            ids = ids.tolist()
        try:
            out = [int(i) for i in ids]
        except (TypeError, ValueError) as exc:
            raise TypeError(f"argument '{name}' must be a sequence of ints: {exc}") from exc
        bad = [i for i in out if i < 0 or i >= self.vocab_size]
        if bad:
            raise ValueError(f"argument '{name}' holds ids outside [0, {self.vocab_size}): "
                             f"{bad[:5]}")
        return out

    # ------------------------------------------------------------------ images
    @property
    def image_token_ids(self) -> torch.Tensor:
        """int64 ``[K]``: vocabulary id of each VQ code (index = code)."""
        return self.image_vocab.code_to_id_table

    @property
    def num_image_codes(self) -> int:
        """How many VQ codes the vocabulary spells."""
        return self.image_vocab.num_codes

    def code_to_id(self, codes: torch.Tensor) -> torch.Tensor:
        """VQ codes (any shape) -> vocabulary ids (int64, same shape and device)."""
        return self.image_vocab.code_to_id(codes)

    def id_to_code(self, ids: torch.Tensor) -> torch.Tensor:
        """Image-token vocabulary ids -> VQ codes; ValueError for a non-image id."""
        return self.image_vocab.id_to_code(ids)

    def is_image_id(self, ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the ids that are image tokens."""
        return self.image_vocab.is_image_id(ids)
