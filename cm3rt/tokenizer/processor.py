"""Processor: interleaved text and images <-> one token stream (Chameleon / CM3Leon format).

    [bos] text ... <racm3:break> IMG x N <eoss> text ... <racm3:break> IMG x N <eoss> ...

Text goes through the BPE tokenizer, each image through the VQGAN (N codes, raster order)
and the image vocabulary map (code -> vocab id).
"""

from __future__ import annotations

from collections.abc import Sequence

import PIL.Image
import torch

from cm3rt.tokenizer.text import TextTokenizer
from cm3rt.tokenizer.vqgan import ImageTokenizer

Item = str | PIL.Image.Image


class Processor:
    """Turns ``[str | PIL.Image, ...]`` into token ids and back."""

    def __init__(self, text_tokenizer: TextTokenizer, image_tokenizer: ImageTokenizer) -> None:
        """Pair a text and an image tokenizer; the vocabulary must spell every VQ code."""
        if not isinstance(text_tokenizer, TextTokenizer):
            raise TypeError(f"argument 'text_tokenizer' must be a TextTokenizer, got "
                            f"{type(text_tokenizer).__name__}")
        if not isinstance(image_tokenizer, ImageTokenizer):
            raise TypeError(f"argument 'image_tokenizer' must be an ImageTokenizer, got "
                            f"{type(image_tokenizer).__name__}")
        if text_tokenizer.num_image_codes != image_tokenizer.codebook_size:
            raise ValueError(
                f"Processor: the text vocabulary spells {text_tokenizer.num_image_codes} image "
                f"codes but the VQGAN codebook has {image_tokenizer.codebook_size}")
        self.text = text_tokenizer
        self.image = image_tokenizer

    @property
    def num_image_tokens(self) -> int:
        """Tokens per image, begin/end-image excluded."""
        return self.image.num_tokens

    def image_ids(self, codes: torch.Tensor) -> list[int]:
        """``boi, ids of codes [N], eoi`` for one image's codes."""
        return [self.text.boi_id, *self.text.code_to_id(codes).tolist(), self.text.eoi_id]

    def encode(self, items: Sequence[Item], add_bos: bool = True) -> list[int]:
        """Token ids of an interleaved list of strings and PIL images (images encoded in
        one batch)."""
        if isinstance(items, (str, PIL.Image.Image)):
            items = [items]
        if not isinstance(items, Sequence):
            raise TypeError(f"argument 'items' must be a list of str / PIL images, got "
                            f"{type(items).__name__}")
        images = []
        for i, item in enumerate(items):
            if isinstance(item, PIL.Image.Image):
                images.append(item)
            elif not isinstance(item, str):
                raise TypeError(f"argument 'items[{i}]' must be a str or a PIL.Image.Image, "
                                f"got {type(item).__module__}.{type(item).__name__}")
        codes = self.image.encode(images) if images else None
        ids = [self.text.bos_id] if add_bos else []
        k = 0
        for item in items:
            if isinstance(item, str):
                ids += self.text.encode(item)
            else:
                ids += self.image_ids(codes[k])
                k += 1
        return ids

    def split(self, ids: Sequence[int] | torch.Tensor) -> list[str | torch.Tensor]:
        """Segment ids into text (decoded str) and image spans (codes ``[N]`` int64).

        An image span is ``boi`` followed by ``num_image_tokens`` image ids; its ``eoi`` may
        be missing at the very end (generation stopped right after the last code). Anything
        else after a ``boi`` raises ValueError naming the position.
        """
        ids = self.text.check_ids(ids)
        n, out, text_run, i = self.num_image_tokens, [], [], 0
        is_img = self.text.is_image_id(torch.tensor(ids, dtype=torch.int64)).tolist() if ids \
            else []

        def flush() -> None:
            if text_run:
                s = self.text.decode(text_run)
                if s:
                    out.append(s)
                text_run.clear()

        while i < len(ids):
            if ids[i] != self.text.boi_id:
                if is_img[i]:
                    raise ValueError(f"argument 'ids': image token {ids[i]} at position {i} "
                                     "is outside an image span")
                if ids[i] != self.text.eoi_id:
                    text_run.append(ids[i])
                i += 1
                continue
            span = ids[i + 1:i + 1 + n]
            if len(span) < n or not all(is_img[i + 1:i + 1 + n]):
                got = next((j for j, f in enumerate(is_img[i + 1:i + 1 + n]) if not f), len(span))
                raise ValueError(f"argument 'ids': the image span opened at position {i} has "
                                 f"{got} image tokens, expected {n}")
            flush()
            out.append(self.text.id_to_code(torch.tensor(span, dtype=torch.int64)))
            i += 1 + n
            if i < len(ids) and ids[i] == self.text.eoi_id:
                i += 1
        flush()
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor) -> list[str | PIL.Image.Image]:
        """Interleaved list of text and PIL images from token ids (images decoded in one
        batch by the VQGAN decoder)."""
        parts = self.split(ids)
        spans = [p for p in parts if isinstance(p, torch.Tensor)]
        if not spans:
            return parts
        images = iter(self.image.decode(torch.stack(spans)))
        return [next(images) if isinstance(p, torch.Tensor) else p for p in parts]
