"""Turn a :class:`Request` into the token prompts of its streams (docs/DESIGN.md "Sequence
format"): cond, [image-cond,] uncond, plus the output grammar of the task.

* text -> image:  cond ``[bos] text [boi]``, uncond ``[bos] [<mask>] [boi]``.
  Retrieved documents go after ``bos`` in cond (and image-cond); in uncond too with
  ``SamplingParams.uncond_docs``.
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

import numbers
from dataclasses import dataclass, field

import torch

from cm3rt.engine.request import TASKS, Request, TokenPrompt
from cm3rt.engine.state import VocabInfo
from cm3rt.tokenizer.processor import Processor, prompt_items

_IMAGE_TASKS = ("text_to_image", "edit")


@dataclass
class BuiltPrompt:
    """A request's streams as ids, plus what the engine needs to run and report it."""

    spec: TokenPrompt
    max_new_tokens: int
    starts_in_image: bool  # the prompt ends with begin-image: generation opens in a span
    prompt_text: str = ""
    docs: list = field(default_factory=list)


def default_max_new_tokens(task: str, vocab: VocabInfo) -> int:
    """One image and its end-of-image for image tasks; a short answer for text tasks."""
    n = vocab.tokens_per_image
    if task in _IMAGE_TASKS:
        return n + 1
    if task == "interleaved":
        return n + 66
    return 64


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


def _retrieve(request: Request, text: str, images: list, processor: Processor, budget: int):
    if request.bank is None or not request.k_docs or budget <= 0:
        return [], []
    # Imported here: the engine works without faiss / open_clip unless retrieval is used.
    from cm3rt.retrieval.augment import retrieve_prefix

    prefix, docs = retrieve_prefix(request.bank, text or None, images or None,
                                   request.k_docs, budget, processor,
                                   max_score=request.max_doc_score)
    return [int(t) for t in prefix], list(docs)


def _shifted(keys: list, by: int) -> list:
    return [(s + by, e + by, k) for s, e, k in keys]


def build_prompt(request: Request, vocab: VocabInfo, processor: Processor | None,
                 max_len: int) -> BuiltPrompt:
    """The streams' prompts of ``request`` (see the module docstring for the formats)."""
    guidance = request.params.guidance
    max_new = request.params.max_new_tokens
    if isinstance(request.prompt, TokenPrompt):
        spec = _check_token_prompt(request.prompt, guidance, vocab)
        starts_in_image = spec.cond[-1] == vocab.boi_id
        if max_new is None:
            max_new = default_max_new_tokens(
                "text_to_image" if starts_in_image else "interleaved", vocab)
        return BuiltPrompt(spec=spec, max_new_tokens=max_new, starts_in_image=starts_in_image)

    task = request.task
    if task not in TASKS:
        raise ValueError(f"argument 'task' must be one of {TASKS}, got {task!r}")
    items = prompt_items(request.prompt, "prompt")
    if processor is None:
        raise ValueError(
            "this engine has no processor (tokenizers): pass Engine(model, processor) or give "
            "the prompt as a TokenPrompt of ids"
        )
    if max_new is None:
        max_new = default_max_new_tokens(task, vocab)
    texts = [it for it in items if isinstance(it, str)]
    images = [it for it in items if not isinstance(it, str)]
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
            suffix_items = prompt_items(request.suffix, "suffix")
    elif request.suffix is not None:
        raise ValueError(f"argument 'suffix' is for task 'infill' only, got task {task!r}")

    # Every image of the request (prompt and suffix) goes through one VQ encoder batch.
    image_ids = processor.encode_images(
        images + [it for it in suffix_items if not isinstance(it, str)])
    for ids in image_ids.values():
        if len(ids) != vocab.tokens_per_image + 2:
            raise ValueError(f"the image tokenizer gave {len(ids) - 2} tokens per image, the "
                             f"engine expects {vocab.tokens_per_image}")
    bos, boi = vocab.bos_id, vocab.boi_id
    mask = [vocab.mask_id] if vocab.mask_id is not None else []

    body_keys: list = []
    body = processor.encode(items, add_bos=False, image_ids=image_ids, content_keys=body_keys)
    if task == "infill":
        body.append(vocab.mask_id)
        suffix_keys: list = []
        suffix = processor.encode(suffix_items, add_bos=False, image_ids=image_ids,
                                  content_keys=suffix_keys)
        body_keys += _shifted(suffix_keys, len(body))
        body += suffix
        body.append(vocab.infill_id)
    ends_in_image = task in _IMAGE_TASKS
    tail = [boi] if ends_in_image else []

    budget = max_len - 1 - len(body) - len(tail) - max_new
    prefix, docs = _retrieve(request, text, images, processor, budget)

    cond = [bos] + prefix + body + tail
    keys = {"cond": _shifted(body_keys, 1 + len(prefix))}
    uncond = image_cond = None
    multi = guidance != "none" and task != "image_to_text"
    if multi:
        # uncond_docs: the documents stand in every stream, so the guidance contrasts the
        # prompt against the documents alone (measured on the default model: TRAINING.md).
        docs_prefix = prefix if request.params.uncond_docs else []
        uncond = [bos] + docs_prefix + mask + ([vocab.infill_id] if task == "infill" else tail)
    if multi and guidance == "cfg3":
        img_keys: list = []
        img_ids = processor.encode(images, add_bos=False, image_ids=image_ids,
                                   content_keys=img_keys)
        image_cond = [bos] + prefix + img_ids + mask + tail
        keys["image_cond"] = _shifted(img_keys, 1 + len(prefix))
    spec = TokenPrompt(
        cond=cond, uncond=uncond, image_cond=image_cond,
        allow_images=task != "image_to_text",
        stop_after_images=1 if ends_in_image else None,
        content_keys=keys,
    )
    return BuiltPrompt(spec=spec, max_new_tokens=max_new, starts_in_image=ends_in_image,
                       prompt_text=text, docs=docs)
