"""The one front door: user arguments -> (Engine, Request) -> output.

``cm3rt.generate``, the ``cm3rt`` command line and the HTTP server all call
:func:`resolve_request`, which resolves, once and in one order, everything a call leaves
open: the model (a directory, a loaded model, an Engine, or the embedded default), device
and dtype, the default model's ``defaults.json``, the memory bank and ``k_docs``, the
best-of-n scorer and the :class:`SamplingParams`. Bad input raises ValueError / TypeError /
FileNotFoundError naming the argument, before any model work.

    out = cm3rt.generate("a red circle", guidance="cfg", cfg_scale=3.0, seed=1)
    out.images[0].save("circle.png")

Engines are cached per (model directory, device, dtype): the weights load and the KV cache
is allocated once per process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cm3rt.api.defaults import DefaultAssets, load_defaults, open_default_bank
from cm3rt.devices import resolve_device, resolve_weight_dtype
from cm3rt.engine import Engine, Request, RequestOutput, SamplingParams, TokenEvent
from cm3rt.engine.request import TASKS, check_k_docs
from cm3rt.retrieval.select import DEFAULT_MAX_SCORE
from cm3rt.tokenizer.processor import check_image, prompt_items

__all__ = ["BUILTIN_SAMPLING", "DEFAULT_K_DOCS", "generate", "load_engine", "pick_task",
           "resolve_request", "run_request"]

# Sampling defaults by task where a model directory (not the embedded default, whose
# defaults.json decides) gives none: images are drawn with classifier-free guidance;
# everything else is SamplingParams' own default.
BUILTIN_SAMPLING: dict[str, dict[str, Any]] = {"text_to_image": {"guidance": "cfg"}}
# Defaults that belong to the task itself, for every model: an edit is guided by the
# three-stream instruct guidance (cond, image-cond, uncond).
TASK_SAMPLING: dict[str, dict[str, Any]] = {"edit": {"guidance": "cfg3"}}
# Documents retrieved for a text -> image request that names a bank but no k_docs.
DEFAULT_K_DOCS = 2
# Tasks that retrieve when k_docs is not given and the model is not the embedded default
# (whose defaults.json says, per task); an explicit k_docs applies to any task.
RETRIEVAL_TASKS = ("text_to_image",)
# max_doc_score not given: the embedded model's defaults.json, else RA-CM3's rule.
FROM_DEFAULTS = "defaults"

_ENGINES: dict[tuple, Engine] = {}
_LOCK = threading.Lock()


def load_engine(model: str | Path | None = None, *, device: str | torch.device | None = None,
                dtype: torch.dtype | str | None = None, tensor_parallel_size: int = 1,
                **engine_kwargs: Any) -> Engine:
    """The cached :class:`Engine` of a model directory (None: the embedded default),
    loaded on ``device`` (default CUDA when usable, else CPU) in ``dtype`` (default bfloat16
    on CUDA, float32 on the CPU). ``tensor_parallel_size=N > 1`` shards the model over N
    processes (:mod:`cm3rt.api.parallel`: spawned here, or the ranks torchrun started)."""
    if model is None:
        model = load_defaults().root  # FileNotFoundError saying what is missing
    if not isinstance(model, (str, Path)):
        raise TypeError(f"argument 'model' must be a model directory, got "
                        f"{type(model).__name__}")
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"argument 'model' must be a model directory, got "
                                f"{str(model)!r} (no such directory)")
    dev = resolve_device(device)
    dt, int8 = resolve_weight_dtype(dtype, dev)
    tp_size = check_tensor_parallel_size(tensor_parallel_size)
    key = (str(path.resolve()), str(dev), dt, int8, tp_size,
           tuple(sorted(engine_kwargs.items())))
    with _LOCK:
        engine = _ENGINES.get(key)
        if engine is None and tp_size > 1:
            from cm3rt.api.parallel import start_engine

            engine = _ENGINES[key] = start_engine(path, tp_size, dev, dt, int8, engine_kwargs)
        elif engine is None:
            from cm3rt.model import load_pretrained

            model_, processor = load_pretrained(path, dtype="int8" if int8 else dt, device=dev)
            engine = _ENGINES[key] = Engine(model_, processor, **engine_kwargs)
        return engine


def check_tensor_parallel_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"argument 'tensor_parallel_size' must be an int >= 1, got {value!r}")
    return value


def pick_task(task: str, has_images: bool, guidance: str | None) -> str:
    """``task="auto"``: text -> image without input images; with images, an edit when
    guidance is "cfg3", else image -> text."""
    if not isinstance(task, str):
        raise TypeError(f"argument 'task' must be a str, got {type(task).__name__}")
    if task != "auto":
        if task not in TASKS:
            raise ValueError(f"argument 'task' must be 'auto' or one of {TASKS}, got {task!r}")
        return task
    if not has_images:
        return "text_to_image"
    return "edit" if guidance == "cfg3" else "image_to_text"


def _engine_for(model: Any, processor: Any, device: Any, dtype: Any,
                tensor_parallel_size: int) -> Engine:
    if isinstance(model, (str, Path)) or model is None:
        if processor is not None:
            raise ValueError("argument 'processor' goes with a loaded model; a model "
                             "directory brings its own tokenizers")
        return load_engine(model, device=device, dtype=dtype,
                           tensor_parallel_size=tensor_parallel_size)
    if device is not None or dtype is not None or tensor_parallel_size != 1:
        raise ValueError("arguments 'device' / 'dtype' / 'tensor_parallel_size' apply to a "
                         f"model directory; this {type(model).__name__} is already loaded")
    if isinstance(model, Engine):
        if processor is not None:
            raise ValueError("argument 'processor' goes with a loaded model, not an Engine")
        return model
    if hasattr(model, "forward_step") and hasattr(model, "compute_logits"):
        return Engine(model, processor)
    raise TypeError(f"argument 'model' must be None, a model directory, a ChameleonModel or "
                    f"an Engine, got {type(model).__name__}")


def _k_docs_and_bank(task: str, bank: Any, k_docs: Any, assets: DefaultAssets | None):
    if k_docs is not None:
        check_k_docs(k_docs)
    if bank is not None and not isinstance(bank, (str, Path)):
        from cm3rt.retrieval.bank import MemoryBank

        if not isinstance(bank, MemoryBank):
            raise TypeError(f"argument 'bank' must be a bank directory or a MemoryBank, got "
                            f"{type(bank).__name__}")
    if k_docs is None:
        has_bank = bank is not None or (assets is not None and assets.bank is not None)
        if not has_bank:
            k_docs = 0
        elif assets is not None:  # the default model's defaults.json, by task
            k_docs = assets.k_docs_for(task)
        else:
            k_docs = DEFAULT_K_DOCS if task in RETRIEVAL_TASKS else 0
    if k_docs == 0:
        return None, 0
    if bank is None:
        if assets is None:
            raise ValueError(f"argument 'k_docs' is {k_docs} but no bank was given: pass "
                             "bank=<bank directory> (CLI: --bank DIR) or k_docs=0")
        return open_default_bank(assets), k_docs
    if isinstance(bank, (str, Path)):
        from cm3rt.retrieval.bank import open_cached

        bank = open_cached(bank)
    return bank, k_docs


def resolve_request(prompt: str | list[Any], model: Any = None,
                    images: list[Any] | None = None, *, task: str = "auto",
                    suffix: str | list[Any] | None = None, bank: Any = None,
                    k_docs: int | None = None, max_doc_score: float | None | str = FROM_DEFAULTS,
                    device: str | None = None, dtype: torch.dtype | str | None = None,
                    processor: Any = None, scorer: Callable | None = None,
                    request_id: str | None = None, tensor_parallel_size: int = 1,
                    doc_sweep: bool | None = None, **sampling: Any) -> tuple[Engine, Request]:
    """Resolve a call's arguments into the engine that serves it and its Request.

    Args: as :func:`generate`. ``sampling`` holds only the SamplingParams fields the caller
    gave; in order, what is left open comes from: :data:`TASK_SAMPLING` (an edit's cfg3),
    the embedded default model's defaults.json (when ``model`` is None) or
    :data:`BUILTIN_SAMPLING` (when a model is given), then SamplingParams' defaults.
    """
    items: list[Any] = []
    if images is not None:
        image_list = list(images) if isinstance(images, (list, tuple)) else [images]
        items += [check_image(im, f"images[{i}]") for i, im in enumerate(image_list)]
    items += prompt_items(prompt, "prompt")
    if suffix is not None:
        suffix = prompt_items(suffix, "suffix")
    if scorer is not None and not callable(scorer):
        raise TypeError(f"argument 'scorer' must be callable, got {type(scorer).__name__}")

    assets = load_defaults() if model is None else None
    has_images = any(not isinstance(x, str) for x in items)
    guidance = sampling.get("guidance", assets.sampling.get("guidance") if assets else None)
    task = pick_task(task, has_images, guidance)
    base = assets.sampling_for(task) if assets is not None else BUILTIN_SAMPLING.get(task, {})
    params = SamplingParams.from_kwargs(**{**base, **TASK_SAMPLING.get(task, {}), **sampling})
    engine = _engine_for(model, processor, device, dtype, tensor_parallel_size)
    bank, k_docs = _k_docs_and_bank(task, bank, k_docs, assets)
    if max_doc_score == FROM_DEFAULTS:
        max_doc_score = assets.max_doc_score if assets is not None else DEFAULT_MAX_SCORE
    if doc_sweep is None:  # the default model's, for its captions with documents
        doc_sweep = (assets is not None and assets.caption_doc_sweep
                     and task == "image_to_text" and k_docs > 0)
    request = Request(prompt=items, task=task, params=params, suffix=suffix, bank=bank,
                      k_docs=k_docs, max_doc_score=max_doc_score, scorer=scorer,
                      request_id=request_id, doc_sweep=doc_sweep)
    return engine, request


def run_request(engine: Engine, request: Request,
                on_event: Callable[[TokenEvent], None] | None = None) -> RequestOutput:
    """Run one request to its output (raising its error, if it failed); ``on_event`` sees
    every generated token as it comes (progress bars, streaming)."""
    out = None
    for event in engine.stream([request]):
        if on_event is not None:
            on_event(event)
        if event.output is not None:
            out = event.output
    return out.raise_for_error()


def generate(prompt: str | list[Any], model: Any = None, images: list[Any] | None = None, *,
             task: str = "auto", suffix: str | list[Any] | None = None, bank: Any = None,
             k_docs: int | None = None, max_doc_score: float | None | str = FROM_DEFAULTS,
             device: str | None = None, dtype: torch.dtype | str | None = None,
             processor: Any = None, scorer: Callable | None = None,
             on_event: Callable[[TokenEvent], None] | None = None,
             tensor_parallel_size: int = 1, doc_sweep: bool | None = None,
             **sampling: Any) -> RequestOutput:
    """Generate for one prompt and return its :class:`RequestOutput`.

    Args:
        prompt: text, or an interleaved list of text and PIL images.
        model: model directory, ChameleonModel (give ``processor``), Engine, or None for the
            embedded default (``cm3rt/assets/default``), whose ``defaults.json`` then fills
            every setting not passed here: for text -> image, retrieval from its bank and
            classifier-free guidance (see :mod:`cm3rt.api.defaults`).
        images: input PIL images, placed before the prompt (captioning, editing).
        task: "auto" or one of the request tasks (see :class:`Request`).
        suffix: infill only: the content after the masked span.
        bank, k_docs: retrieval memory bank (directory or MemoryBank) and the documents to
            prepend. ``k_docs=None``: with the default model, its defaults.json's documents
            for the task (text -> image ``k_docs``, captioning ``caption.k_docs``; its own
            bank unless ``bank`` is given); with another model, :data:`DEFAULT_K_DOCS` for
            text -> image when a bank is given; otherwise 0. ``k_docs=0`` turns retrieval
            off.
        max_doc_score: drop retrieved documents more similar to the query than this
            (cosine); None turns the rule off. Default: the default model's defaults.json
            ``max_doc_score``, else RA-CM3's 0.9 (against training-set copies).
        device, dtype: where / how to load a model directory (default CUDA bf16 when
            available, else CPU float32).
        scorer: best-of-n ranking for this request, ``scorer(prompt_text, images) ->
            scores`` (e.g. ``cm3rt.retrieval.ClipEncoder(...).score``).
        on_event: called with every :class:`TokenEvent` as it is generated.
        tensor_parallel_size: shard a model directory over this many processes (gloo on the
            CPU, NCCL on CUDA); see :mod:`cm3rt.api.parallel`.
        doc_sweep: captions only: caption with 0..k_docs documents and keep the caption the
            bank's CLIP scores best against the image (``Request.doc_sweep``). None: the
            default model's defaults.json ``caption.doc_sweep`` (when it retrieves), else
            False.
        **sampling: :class:`SamplingParams` fields (temperature, top_k, top_p, guidance,
            cfg_scale, cfg_image_scale, cd_alpha, cd_k, n, seed, max_new_tokens).

    Returns:
        The output: ``.images`` (PIL, best sample first), ``.text``, ``.samples``.

    Raises:
        ValueError / TypeError / FileNotFoundError for bad input; RuntimeError when
        generation fails (e.g. the sampler finds no valid token).
    """
    engine, request = resolve_request(
        prompt, model, images, task=task, suffix=suffix, bank=bank, k_docs=k_docs,
        max_doc_score=max_doc_score, device=device, dtype=dtype, processor=processor,
        scorer=scorer, tensor_parallel_size=tensor_parallel_size, doc_sweep=doc_sweep,
        **sampling)
    return run_request(engine, request, on_event)
