"""Processor: interleaved text and images <-> one token stream (Chameleon / CM3Leon format).

    [bos] text ... <racm3:break> IMG x N <eoss> text ... <racm3:break> IMG x N <eoss> ...

Text goes through the BPE tokenizer, each image through the VQGAN (N codes, raster order)
and the image vocabulary map (code -> vocab id). This is the one codec of the project:
prompts (:meth:`encode`), retrieved documents (:meth:`document_ids`) and generated output
(:meth:`split` / :meth:`decode_generated`) all go through it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import PIL.Image
import torch

from cm3rt.tokenizer.text import TextTokenizer, check_text
from cm3rt.tokenizer.vqgan import ImageTokenizer

Item = str | PIL.Image.Image
# (start, end, digest): token range [start, end) holds the image with this content digest.
ContentKey = tuple[int, int, bytes]


def prompt_items(value: object, name: str = "prompt") -> list[Item]:
    """``value`` (a str, a PIL image, or a list / tuple of them) as a list of items;
    TypeError / ValueError naming ``name[i]`` for anything else (a path string where an
    image belongs is text, so callers that take images separately check them with
    :func:`check_image`)."""
    if isinstance(value, str):
        return [check_text(value, name)]
    if isinstance(value, PIL.Image.Image):
        return [check_image(value, name)]
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"argument '{name}' must be a str, a PIL image or a list of them, "
                        f"got {type(value).__name__}")
    items = list(value)
    for i, item in enumerate(items):
        if isinstance(item, str):
            check_text(item, f"{name}[{i}]")
        else:
            check_image(item, f"{name}[{i}]")
    return items


def check_image(image: object, name: str) -> PIL.Image.Image:
    """``image`` if it is a non-empty PIL image, else TypeError / ValueError naming it."""
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"argument '{name}' must be a PIL.Image.Image, got "
                        f"{type(image).__module__}.{type(image).__name__}")
    if image.size[0] < 1 or image.size[1] < 1:
        raise ValueError(f"argument '{name}' is an empty image (size {image.size})")
    return image


def image_digest(image: PIL.Image.Image) -> bytes:
    """A content key for an image: a digest of its mode, size and pixels (prefix caching
    must never confuse two images whose placeholder ids are equal)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}|{image.size[0]}x{image.size[1]}|".encode())
    h.update(image.tobytes())
    return h.digest()


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

    # ------------------------------------------------------------------ encoding
    def image_ids(self, codes: torch.Tensor) -> list[int]:
        """``boi, ids of codes [N], eoi`` for one image's codes."""
        return [self.text.boi_id, *self.text.code_to_id(codes).tolist(), self.text.eoi_id]

    def encode_images(self, images: Sequence[PIL.Image.Image]) -> dict[int, list[int]]:
        """``id(image) -> [boi, N image ids, eoi]`` for each image, all encoded in one VQ
        batch; pass the result to :meth:`encode` as ``image_ids``."""
        todo = list({id(im): im for im in images}.values())
        if not todo:
            return {}
        codes = self.image.encode(todo)
        return {id(im): self.image_ids(c) for im, c in zip(todo, codes)}

    def encode(self, items: Sequence[Item] | Item, add_bos: bool = True, *,
               image_ids: dict[int, list[int]] | None = None,
               content_keys: list[ContentKey] | None = None) -> list[int]:
        """Token ids of an interleaved list of strings and PIL images.

        Images are encoded in one batch, or looked up in ``image_ids`` (from
        :meth:`encode_images`) when given. With ``content_keys`` the ``(start, end,
        digest)`` of each image span (positions in the returned ids) is appended to it.
        """
        items = prompt_items(items, "items")
        images = [it for it in items if not isinstance(it, str)]
        known = image_ids if image_ids is not None else {}
        missing = [im for im in images if id(im) not in known]
        if missing:
            known = {**known, **self.encode_images(missing)}
        ids = [self.text.bos_id] if add_bos else []
        for item in items:
            if isinstance(item, str):
                if item:
                    ids += self.text.encode(item)
                continue
            start = len(ids)
            ids += known[id(item)]
            if content_keys is not None:
                content_keys.append((start, len(ids), image_digest(item)))
        return ids

    def document_ids(self, caption: str | None, codes: torch.Tensor | None) -> list[int]:
        """Ids of one retrieved document: ``caption <boi> image ids <eoi>`` (a text-only
        document is its caption, an image-only one its image span)."""
        ids = self.text.encode(caption) if caption else []  # never wrapped in bos / eos
        if codes is not None:
            ids += self.image_ids(torch.as_tensor(codes).reshape(-1))
        return ids

    # ------------------------------------------------------------------ decoding
    def split(self, ids: Sequence[int] | torch.Tensor, *, starts_in_image: bool = False,
              strict: bool = True) -> list[str | torch.Tensor]:
        """Segment ids into text (decoded str) and image spans (codes ``[N]`` int64).

        An image span is ``boi`` followed by ``num_image_tokens`` image ids; its ``eoi`` may
        be missing at the very end (generation stopped right after the last code).
        ``starts_in_image``: the ids continue a prompt that ended with ``boi``.
        ``strict`` (default): a malformed span or an image id outside a span raises
        ValueError naming the position; otherwise (generated output) an incomplete span is
        dropped. Special tokens (bos, eos, eoi) never appear in the text.
        """
        ids = self.text.check_ids(ids)
        n, boi, eoi = self.num_image_tokens, self.text.boi_id, self.text.eoi_id
        is_img = self.text.is_image_id(torch.tensor(ids, dtype=torch.int64)).tolist() \
            if ids else []
        out: list[str | torch.Tensor] = []
        text_run: list[int] = []
        span: list[int] | None = [] if starts_in_image else None
        span_at = -1

        def flush_text() -> None:
            if text_run:
                s = self.text.decode(text_run)
                if s:
                    out.append(s)
                text_run.clear()

        def close_span() -> None:
            if len(span) == n:
                out.append(self.text.id_to_code(torch.tensor(span, dtype=torch.int64)))
            elif strict:
                raise ValueError(f"argument 'ids': the image span opened at position {span_at} "
                                 f"has {len(span)} image tokens, expected {n}")

        for i, t in enumerate(ids):
            if span is not None:
                if t == eoi:
                    close_span()
                    span = None
                    continue
                if len(span) < n:
                    if not is_img[i]:
                        if strict:
                            raise ValueError(f"argument 'ids': the image span opened at "
                                             f"position {span_at} has {len(span)} image "
                                             f"tokens, expected {n}")
                        span = None  # a broken span: drop it, read on as text
                    else:
                        span.append(t)
                        continue
                else:
                    close_span()  # complete without its eoi
                    span = None
            if t == boi:
                flush_text()
                span, span_at = [], i
            elif is_img[i]:
                if strict:
                    raise ValueError(f"argument 'ids': image token {t} at position {i} is "
                                     "outside an image span")
            elif t != eoi:
                text_run.append(t)
        if span is not None:
            close_span()
        flush_text()
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor) -> list[str | PIL.Image.Image]:
        """Interleaved list of text and PIL images from token ids (strict :meth:`split`;
        images decoded in one batch by the VQGAN decoder)."""
        return self._decode_parts([self.split(ids)])[0]

    def decode_generated(self, samples: Sequence[Sequence[int]], starts_in_image: bool
                         ) -> list[list[str | PIL.Image.Image]]:
        """Decode generated token ids of several samples (lenient :meth:`split`: a span cut
        short is dropped); every image of every sample goes through one decoder batch."""
        return self._decode_parts([self.split(s, starts_in_image=starts_in_image, strict=False)
                                   for s in samples])

    def _decode_parts(self, per_sample: list[list[str | torch.Tensor]]
                      ) -> list[list[str | PIL.Image.Image]]:
        spans = [p for parts in per_sample for p in parts if isinstance(p, torch.Tensor)]
        if not spans:
            return per_sample
        images = iter(self.image.decode(torch.stack(spans)))
        return [[next(images) if isinstance(p, torch.Tensor) else p for p in parts]
                for parts in per_sample]
