"""The bank manifest: which encoder, image tokenizer and index a bank was built with.

Written once, atomically, when the bank is created; a bank is refused when opened or
extended with an encoder or image tokenizer other than the ones it names.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .clip import EncoderIdentity

FORMAT = "cm3rt-memory-bank"
VERSION = 1
MANIFEST = "manifest.json"
DATABASE = "docs.sqlite"
INDEX = "index.faiss"


@dataclass(frozen=True)
class TokenizerIdentity:
    """What a bank records about the image tokenizer that produced its VQ codes."""

    identity: str
    num_tokens: int
    codebook_size: int
    kind: str

    @classmethod
    def of(cls, tokenizer: Any) -> TokenizerIdentity:
        for attr in ("identity", "num_tokens", "codebook_size"):
            if not hasattr(tokenizer, attr):
                raise TypeError(f"image_tokenizer: expected an ImageTokenizer (with identity(), "
                                f"num_tokens, codebook_size), got {type(tokenizer).__name__}")
        return cls(identity=str(tokenizer.identity()), num_tokens=int(tokenizer.num_tokens),
                   codebook_size=int(tokenizer.codebook_size),
                   kind=type(tokenizer).__qualname__)

    @property
    def codes_dtype(self) -> str:
        return "<u2" if self.codebook_size <= 1 << 16 else "<i4"


@dataclass(frozen=True)
class Manifest:
    encoder: EncoderIdentity
    image_tokenizer: TokenizerIdentity | None
    index: str  # "flat", "ivf" or a FAISS factory string
    nprobe: int | None = None

    @property
    def embed_dim(self) -> int:
        return self.encoder.embed_dim

    def to_json(self) -> str:
        tok = self.image_tokenizer
        return json.dumps({
            "format": FORMAT, "version": VERSION,
            "encoder": self.encoder.to_dict(),
            "image_tokenizer": None if tok is None else tok.__dict__,
            "index": {"spec": self.index, "metric": "inner_product", "nprobe": self.nprobe},
            "files": {"database": DATABASE, "index": INDEX},
        }, indent=2)

    @classmethod
    def read(cls, bank_dir: Path) -> Manifest:
        path = bank_dir / MANIFEST
        if not bank_dir.is_dir():
            raise FileNotFoundError(f"path: memory bank directory {bank_dir} does not exist")
        if not path.is_file():
            raise FileNotFoundError(f"path: {bank_dir} is not a memory bank ({MANIFEST} missing)")
        try:
            d = json.loads(path.read_text())
            if d.get("format") != FORMAT:
                raise ValueError(f"format {d.get('format')!r}, expected {FORMAT!r}")
            if d.get("version") != VERSION:
                raise ValueError(f"version {d.get('version')!r}, expected {VERSION}")
            tok = d["image_tokenizer"]
            return cls(encoder=EncoderIdentity.from_dict(d["encoder"]),
                       image_tokenizer=None if tok is None else TokenizerIdentity(**tok),
                       index=str(d["index"]["spec"]), nprobe=d["index"].get("nprobe"))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"path: {path} is not a valid memory bank manifest: {e}") from e

    def write(self, bank_dir: Path) -> None:
        tmp = bank_dir / (MANIFEST + ".tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, bank_dir / MANIFEST)

    def check_encoder(self, encoder: EncoderIdentity, where: Path) -> None:
        if not self.encoder.same_encoder(encoder):
            raise ValueError(
                f"encoder: the bank at {where} was built with encoder {self.encoder.arch!r} "
                f"(dim {self.encoder.embed_dim}, weights sha256 {self.encoder.digest[:12]}), got "
                f"{encoder.arch!r} (dim {encoder.embed_dim}, weights sha256 "
                f"{encoder.digest[:12]}); rebuild the bank or use its encoder")

    def check_tokenizer(self, tok: TokenizerIdentity | None, where: Path) -> None:
        mine = self.image_tokenizer
        if tok is None or mine is None:
            return
        if (mine.identity, mine.num_tokens, mine.codebook_size) != (
                tok.identity, tok.num_tokens, tok.codebook_size):
            raise ValueError(
                f"image_tokenizer: the bank at {where} holds codes of image tokenizer "
                f"{mine.kind} {mine.identity[:12]} ({mine.num_tokens} tokens, "
                f"{mine.codebook_size} codes), got {tok.kind} {tok.identity[:12]} "
                f"({tok.num_tokens} tokens, {tok.codebook_size} codes)")
