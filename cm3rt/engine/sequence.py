"""Turn a :class:`Request` into the token prompts of its streams (DESIGN.md "Sequence
format"): cond, [image-cond,] uncond, plus the output grammar of the task.

* text -> image:  cond ``[bos] text [boi]``, uncond ``[bos] [<mask>] [boi]``.
* edit (cfg3):    cond ``[bos] image text [boi]``, image-cond ``[bos] image [<mask>] [boi]``,
  uncond ``[bos] [<mask>] [boi]``.
* image -> text:  ``[bos] image text`` (text output only, one stream: guidance applies
  inside generated image spans only, and a caption has none).
* infill (CM3):   ``[bos] prefix <mask> suffix <infill>``; the span's content follows.
* interleaved:    ``[bos] prompt``; text and images until end of sequence.
An image is ``[boi] codes [eoi]``; ``<mask>`` replaces the text in unconditional prompts
where the vocabulary has it, else it is left out (Chameleon's ``[bos, boi]``).
"""

from __future__ import annotations

import hashlib
import numbers
from dataclasses import dataclass, field

import torch

from cm3rt.engine.request import TASKS, Request, TokenPrompt
from cm3rt.engine.state import VocabInfo, processor_parts

try:  # PIL is a runtime dependency; keep the import error readable if it is missing
    from PIL import Image as _PILImage
except ImportError:  # pragma: no cover
    _PILImage = None

_IMAGE_TASKS = ("text_to_image", "edit")


@dataclass
class BuiltPrompt:
    """A request's streams as ids, plus what the engine reports back."""

    spec: TokenPrompt
    prompt_text: str = ""
    docs: list = field(default_factory=list)
    task: str = "interleaved"


def default_max_new_tokens(task: str, vocab: VocabInfo) -> int:
    """One image and its end-of-image for image tasks; a short answer for text tasks."""
    n = vocab.tokens_per_image
    if task in _IMAGE_TASKS:
        return n + 1
    if task == "interleaved":
        return n + 66
    return 64


def image_digest(img) -> bytes:
    """A content key for an image: a digest of its mode, size and pixels."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{img.mode}|{img.size[0]}x{img.size[1]}|".encode())
    h.update(img.tobytes())
    return h.digest()


def _check_items(prompt, name: str) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if _PILImage is not None and isinstance(prompt, _PILImage.Image):
        return [prompt]
    if not isinstance(prompt, (list, tuple)):
        raise TypeError(
            f"argument '{name}' must be a str, a PIL image or a list of them, "
            f"got {type(prompt).__name__}"
        )
    items = list(prompt)
    for i, it in enumerate(items):
        if isinstance(it, str):
            continue
        if _PILImage is not None and isinstance(it, _PILImage.Image):
            continue
        raise TypeError(
            f"argument '{name}[{i}]' must be a str or a PIL.Image.Image, got "
            f"{type(it).__module__}.{type(it).__name__}"
        )
    return items


def _is_image(it) -> bool:
    return not isinstance(it, str)


class _Encoder:
    """Encodes text pieces and images (all images of a request in one VQ batch)."""

    def __init__(self, processor, vocab: VocabInfo):
        self.processor = processor
        self.vocab = vocab
        self.text_tok, self.image_tok = processor_parts(processor)
        self._codes: dict[int, list[int]] = {}

    def prepare_images(self, images: list) -> None:
        todo = [im for im in images if id(im) not in self._codes]
        if not todo:
            return
        if self.image_tok is None:
            raise ValueError("the prompt has images but the processor has no image tokenizer")
        for i, im in enumerate(todo):
            if im.size[0] < 1 or im.size[1] < 1:
                raise ValueError(f"prompt image {i} is empty (size {im.size})")
        codes = self.image_tok.encode(todo)
        codes = codes.tolist() if isinstance(codes, torch.Tensor) else [list(c) for c in codes]
        ids = self.text_tok.code_to_id(torch.tensor(codes, dtype=torch.long))
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        for im, row in zip(todo, ids):
            if len(row) != self.vocab.tokens_per_image:
                raise ValueError(
                    f"the image tokenizer gave {len(row)} tokens per image, the engine expects "
                    f"{self.vocab.tokens_per_image}"
                )
            self._codes[id(im)] = [int(t) for t in row]

    def encode(self, items: list, ids: list[int], keys: list) -> None:
        """Append ``items`` to ``ids`` (and their content keys to ``keys``)."""
        for it in items:
            if isinstance(it, str):
                if it:
                    ids.extend(int(t) for t in self.text_tok.encode(it))
            else:
                start = len(ids)
                ids.append(self.vocab.boi_id)
                ids.extend(self._codes[id(it)])
                ids.append(self.vocab.eoi_id)
                keys.append((start, len(ids), image_digest(it)))


def _validate_ids(ids, name: str, vocab_size: int) -> list[int]:
    if not isinstance(ids, (list, tuple)) and not isinstance(ids, torch.Tensor):
        raise TypeError(f"argument '{name}' must be a list of token ids, got {type(ids).__name__}")
    out = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    for t in out:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise TypeError(f"argument '{name}' must hold ints, got {type(t).__name__} {t!r}")
        if not (0 <= t < vocab_size):
            raise ValueError(f"argument '{name}' holds id {t}, outside the vocabulary [0, {vocab_size})")
    if not out:
        raise ValueError(f"argument '{name}' is empty: a prompt needs at least one token")
    return [int(t) for t in out]


def _check_token_prompt(tp: TokenPrompt, guidance: str, vocab: VocabInfo) -> TokenPrompt:
    V = vocab.vocab_size
    cond = _validate_ids(tp.cond, "prompt.cond", V)
    uncond = image_cond = None
    if guidance in ("cfg", "cdk", "cfg3"):
        if tp.uncond is None:
            raise ValueError(f"guidance {guidance!r} needs TokenPrompt.uncond, got None")
        uncond = _validate_ids(tp.uncond, "prompt.uncond", V)
    if guidance == "cfg3":
        if tp.image_cond is None:
            raise ValueError("guidance 'cfg3' needs TokenPrompt.image_cond, got None")
        image_cond = _validate_ids(tp.image_cond, "prompt.image_cond", V)
    if tp.stop_after_images is not None and tp.stop_after_images < 1:
        raise ValueError(
            f"TokenPrompt.stop_after_images must be >= 1 or None, got {tp.stop_after_images}"
        )
    return TokenPrompt(cond=cond, uncond=uncond, image_cond=image_cond,
                       allow_images=bool(tp.allow_images),
                       stop_after_images=tp.stop_after_images,
                       content_keys=dict(tp.content_keys))


def _retrieve(request: Request, text: str, images: list, processor, budget: int):
    if request.bank is None or not request.k_docs:
        return [], []
    if isinstance(request.k_docs, bool) or not isinstance(request.k_docs, int) \
            or request.k_docs < 0:
        raise ValueError(f"argument 'k_docs' must be an int >= 0, got {request.k_docs!r}")
    if budget <= 0:
        return [], []
    # Imported here: the engine works without faiss / open_clip unless retrieval is used.
    from cm3rt.retrieval.augment import retrieve_prefix

    prefix, docs = retrieve_prefix(request.bank, text or None, images or None,
                                   request.k_docs, budget, processor)
    return [int(t) for t in prefix], list(docs)


def build_prompt(request: Request, vocab: VocabInfo, processor, max_len: int,
                 max_new_tokens: int) -> BuiltPrompt:
    """The streams' prompts of ``request`` (see the module docstring for the formats)."""
    guidance = request.params.guidance
    if isinstance(request.prompt, TokenPrompt):
        spec = _check_token_prompt(request.prompt, guidance, vocab)
        return BuiltPrompt(spec=spec, task="tokens")

    task = request.task
    if task not in TASKS:
        raise ValueError(f"argument 'task' must be one of {TASKS}, got {task!r}")
    items = _check_items(request.prompt, "prompt")
    if processor is None:
        raise ValueError(
            "this engine has no processor (tokenizers): pass Engine(model, processor) or give "
            "the prompt as a TokenPrompt of ids"
        )
    texts = [it for it in items if isinstance(it, str)]
    images = [it for it in items if _is_image(it)]
    text = "".join(texts)
    if not text.strip() and not images:
        raise ValueError("argument 'prompt' is empty: give some text or an image")
    if task == "text_to_image" and not text.strip():
        raise ValueError("argument 'prompt' has no text: text_to_image needs a description")
    if task in ("image_to_text", "edit") and not images:
        raise ValueError(f"task {task!r} needs an image in the prompt, got none")
    if guidance == "cfg3" and task in ("text_to_image", "edit", "interleaved") and not images:
        raise ValueError(
            "guidance 'cfg3' (text-guided editing) needs an input image in the prompt"
        )
    suffix_items: list = []
    if task == "infill":
        if vocab.mask_id is None or vocab.infill_id is None:
            raise ValueError("task 'infill' needs <mask> and <infill> tokens; this model's "
                             "vocabulary has none")
        if request.suffix is not None:
            suffix_items = _check_items(request.suffix, "suffix")
    elif request.suffix is not None:
        raise ValueError(f"argument 'suffix' is for task 'infill' only, got task {task!r}")

    enc = _Encoder(processor, vocab)
    enc.prepare_images(images + [it for it in suffix_items if _is_image(it)])
    bos, boi = vocab.bos_id, vocab.boi_id
    mask = [vocab.mask_id] if vocab.mask_id is not None else []

    body: list[int] = []
    body_keys: list = []
    enc.encode(items, body, body_keys)
    if task == "infill":
        body.append(vocab.mask_id)
        enc.encode(suffix_items, body, body_keys)
        body.append(vocab.infill_id)
    ends_in_image = task in _IMAGE_TASKS
    tail = [boi] if ends_in_image else []

    budget = max_len - 1 - len(body) - len(tail) - max_new_tokens
    prefix, docs = _retrieve(request, text, images, processor, budget)

    def shifted(keys, by):
        return [(s + by, e + by, k) for s, e, k in keys]

    cond = [bos] + prefix + body + tail
    keys = {"cond": shifted(body_keys, 1 + len(prefix))}
    uncond = image_cond = None
    multi = guidance != "none" and task != "image_to_text"
    if multi:
        uncond = [bos] + mask + tail
        if task == "infill":
            uncond = [bos] + mask + [vocab.infill_id]
    if multi and guidance == "cfg3":
        img_ids: list[int] = []
        img_keys: list = []
        enc.encode(images, img_ids, img_keys)
        image_cond = [bos] + prefix + img_ids + mask + tail
        keys["image_cond"] = shifted(img_keys, 1 + len(prefix))
    spec = TokenPrompt(
        cond=cond, uncond=uncond, image_cond=image_cond,
        allow_images=task != "image_to_text",
        stop_after_images=1 if ends_in_image else None,
        content_keys=keys,
    )
    return BuiltPrompt(spec=spec, prompt_text=text, docs=docs, task=task)
