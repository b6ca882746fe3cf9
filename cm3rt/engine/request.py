"""What a caller submits (:class:`Request`, :class:`TokenPrompt`) and gets back
(:class:`RequestOutput`, :class:`SampleOutput`, :class:`TokenEvent`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cm3rt.engine.params import SamplingParams
from cm3rt.retrieval.select import DEFAULT_MAX_SCORE

TASKS = ("text_to_image", "image_to_text", "infill", "interleaved", "edit")


@dataclass
class TokenPrompt:
    """A request given as token ids (tests, benchmarks, callers with their own tokenizer).

    Attributes:
        cond: the conditional stream's prompt ids.
        uncond: the unconditional stream's prompt ids (needed for cfg / cdk / cfg3).
        image_cond: the image-conditional stream's prompt ids (needed for cfg3).
        allow_images: whether text mode may open an image span (sample begin-image).
        stop_after_images: finish once this many images were generated (None: no limit).
        content_keys: per stream role ("cond", "image_cond", "uncond"), ``(start, end,
            key)`` spans naming the content (e.g. an image digest) of token ranges, so that
            prefix caching never confuses two images with equal placeholder ids.
    A prompt whose ids end with begin-image starts inside an image span.
    """

    cond: list[int]
    uncond: list[int] | None = None
    image_cond: list[int] | None = None
    allow_images: bool = True
    stop_after_images: int | None = None
    content_keys: dict[str, list[tuple[int, int, bytes]]] = field(default_factory=dict)


def check_max_doc_score(score: object) -> float | None:
    """``score`` if it is None or a number in [-1, 1] (a cosine similarity), else ValueError."""
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))
                              or not -1.0 <= score <= 1.0):
        raise ValueError(f"argument 'max_doc_score' must be None or a cosine similarity in "
                         f"[-1, 1], got {score!r}")
    return score


def check_k_docs(k_docs: object) -> int:
    """``k_docs`` if it is an int >= 0 (documents to retrieve), else ValueError."""
    if isinstance(k_docs, bool) or not isinstance(k_docs, int) or k_docs < 0:
        raise ValueError(f"argument 'k_docs' must be an int >= 0, got {k_docs!r}")
    return k_docs


@dataclass
class Request:
    """One generation request.

    Attributes:
        prompt: text, or an interleaved list of text and PIL images; or a
            :class:`TokenPrompt` for raw ids.
        task: "text_to_image" (draw one image for the prompt), "image_to_text" (caption /
            answer about the prompt's images), "infill" (CM3: generate the span between
            ``prompt`` and ``suffix``), "interleaved" (text and images until end of
            sequence), "edit" (text-guided editing of the prompt's image; use guidance
            "cfg3" for the three-stream instruct guidance).
        params: sampling parameters.
        suffix: infill only: the content after the masked span (text or interleaved list).
        bank: optional retrieval memory bank; with ``k_docs > 0`` retrieved documents are
            prepended to the conditional streams.
        k_docs: retrieved documents to prepend.
        max_doc_score: the retrieval rule dropping documents more similar to the query than
            this (RA-CM3's 0.9 against training-set copies); None turns it off.
        request_id: caller's id (default: assigned by the engine).
        scorer: best-of-n ranking of this request's samples, ``scorer(prompt_text, images)
            -> scores`` (default: the engine's scorer).
        doc_sweep: image_to_text with a bank and ``k_docs >= 1`` only: caption once with
            each number of retrieved documents 0, 1, ..., ``k_docs`` (batched together) and
            keep the ``params.n`` captions the bank's CLIP scores highest against the
            prompt's first image (:mod:`cm3rt.engine.doc_sweep`). A retrieved document can
            name what the model never saw, or mislead it about what it knows; the
            retriever's CLIP tells which caption fits the image.
    """

    prompt: str | Sequence[Any] | TokenPrompt
    task: str = "text_to_image"
    params: SamplingParams = field(default_factory=SamplingParams)
    suffix: str | Sequence[Any] | None = None
    bank: Any = None
    k_docs: int = 0
    max_doc_score: float | None = DEFAULT_MAX_SCORE
    request_id: str | None = None
    scorer: Callable[[str, list[Any]], Sequence[float]] | None = None
    doc_sweep: bool = False

    @classmethod
    def of(cls, request: Request | str | TokenPrompt,
           params: SamplingParams | None = None) -> Request:
        """``request`` as a Request: a str or TokenPrompt gets ``params`` (default
        SamplingParams()); a Request must carry its own."""
        if isinstance(request, (str, TokenPrompt)):
            return cls(prompt=request, params=params or SamplingParams())
        if not isinstance(request, Request):
            raise TypeError(f"argument 'request' must be a Request, str or TokenPrompt, got "
                            f"{type(request).__name__}")
        if params is not None:
            raise ValueError("give the SamplingParams inside the Request or as 'params', "
                             "not both")
        return request

    def __post_init__(self) -> None:
        if not isinstance(self.params, SamplingParams):
            raise TypeError(f"argument 'params' must be a SamplingParams, got "
                            f"{type(self.params).__name__}")
        if self.scorer is not None and not callable(self.scorer):
            raise TypeError(f"argument 'scorer' must be callable, got "
                            f"{type(self.scorer).__name__}")
        check_k_docs(self.k_docs)
        check_max_doc_score(self.max_doc_score)
        check_doc_sweep(self)


def check_doc_sweep(request: Request) -> None:
    """ValueError / TypeError unless ``request.doc_sweep`` is False or can be carried out."""
    if not isinstance(request.doc_sweep, bool):
        raise TypeError(f"argument 'doc_sweep' must be a bool, got "
                        f"{type(request.doc_sweep).__name__}")
    if not request.doc_sweep:
        return
    if request.task != "image_to_text":
        raise ValueError(f"argument 'doc_sweep' applies to task 'image_to_text' (captions "
                         f"ranked against the image), got task {request.task!r}")
    if isinstance(request.prompt, (TokenPrompt, str)) or all(
            isinstance(x, str) for x in request.prompt):
        raise ValueError("argument 'doc_sweep' needs a prompt holding an image (the captions "
                         "are scored against its first image)")
    if request.bank is None or request.k_docs < 1:
        raise ValueError(f"argument 'doc_sweep' needs a bank and k_docs >= 1 (captions with "
                         f"0..k_docs documents), got {'no' if request.bank is None else 'a'} "
                         f"bank and k_docs {request.k_docs}")


@dataclass
class SampleOutput:
    """One sample (group of streams) of a request.

    Attributes:
        index: sample index in 0..n-1.
        token_ids: generated ids (forced end-of-image tokens included).
        logprobs: log-probability of each generated id (0.0 for forced ids).
        finish_reason: "stop" (end of sequence / image done), "length" or "error".
        segments: decoded output, text strings and PIL images in order (needs a processor).
        score: the best-of-n scorer's score of the first image, when a scorer is set.
    """

    index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    segments: list[Any] = field(default_factory=list)
    score: float | None = None

    @property
    def text(self) -> str:
        return "".join(s for s in self.segments if isinstance(s, str))

    @property
    def images(self) -> list[Any]:
        return [s for s in self.segments if not isinstance(s, str)]


@dataclass
class RequestOutput:
    """The result of one request: its samples, best first when a scorer ranked them.

    ``error`` is set (and ``samples`` may be empty) when the request failed; the engine
    keeps serving the other requests.
    """

    request_id: str
    prompt_token_ids: list[int]
    samples: list[SampleOutput] = field(default_factory=list)
    error: Exception | None = None
    docs: list[Any] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def text(self) -> str:
        """Text of the best (first) sample."""
        return self.samples[0].text if self.samples else ""

    @property
    def images(self) -> list[Any]:
        """Images of all samples, best sample first."""
        return [im for s in self.samples for im in s.images]

    @property
    def image(self) -> Any:
        """The best sample's first image (None if there is none)."""
        for s in self.samples:
            if s.images:
                return s.images[0]
        return None

    def raise_for_error(self) -> RequestOutput:
        if self.error is not None:
            raise self.error
        return self


@dataclass
class TokenEvent:
    """One generated token, as :meth:`Engine.stream` reports it.

    ``image_index`` / ``image_pos``: which generated image of the sample and which code of
    it this token is (None outside image spans). ``output`` is set on the last event of a
    request (also for a failed request, whose event carries token -1).
    """

    request_id: str
    sample: int
    token: int
    logprob: float
    image_index: int | None = None
    image_pos: int | None = None
    output: RequestOutput | None = None
