"""``cm3rt.generate``: one call from a prompt to images / text.

    out = cm3rt.generate("a red circle", guidance="cfg", cfg_scale=3.0, seed=1)
    out.images[0].save("circle.png")

Engines are cached per (model directory, device, dtype): the weights load and the KV cache
is allocated once per process.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from cm3rt.engine.engine import Engine
from cm3rt.engine.params import SamplingParams
from cm3rt.engine.request import TASKS, Request, RequestOutput

_ENGINES: dict[tuple, Engine] = {}
_LOCK = threading.Lock()


def default_model_dir() -> Path:
    """The embedded default model's directory (``cm3rt/assets/default``)."""
    from cm3rt.engine import defaults

    return defaults.default_model_dir()


def default_device() -> str:
    """"cuda" when a GPU and the CUDA kernels are available, else "cpu"."""
    from cm3rt import ops

    return "cuda" if torch.cuda.is_available() and ops.cuda_available() else "cpu"


def resolve_dtype(dtype: torch.dtype | str | None, device: str) -> torch.dtype:
    """bfloat16 on CUDA, float32 on the CPU unless given ("float32", "bf16", ...)."""
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if not isinstance(dtype, str) or dtype.lower() not in names:
        raise ValueError(f"argument 'dtype' must be one of {sorted(names)}, got {dtype!r}")
    return names[dtype.lower()]


def get_engine(model: Any = None, *, processor: Any = None, device: str | None = None,
               dtype: torch.dtype | str | None = None, **engine_kwargs: Any) -> Engine:
    """An :class:`Engine` for ``model``: an Engine (returned as is), a model directory
    (loaded once, cached), a loaded ChameleonModel (with ``processor``), or None for the
    embedded default model."""
    if isinstance(model, Engine):
        return model
    device = device or default_device()
    if model is None:
        from cm3rt.engine.defaults import load_defaults

        model = load_defaults().root  # FileNotFoundError saying what is missing
    if isinstance(model, (str, Path)):
        path = Path(model).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"argument 'model' must be a model directory, got "
                                    f"{str(model)!r} (no such directory)")
        dt = resolve_dtype(dtype, device)
        key = (str(path.resolve()), str(device), dt, tuple(sorted(engine_kwargs.items())))
        with _LOCK:
            eng = _ENGINES.get(key)
            if eng is None:
                from cm3rt.model import load_pretrained

                m, proc = load_pretrained(path, dtype=dt, device=device)
                eng = _ENGINES[key] = Engine(m, proc, **engine_kwargs)
            return eng
    if hasattr(model, "forward_step") and hasattr(model, "compute_logits"):
        return Engine(model, processor, **engine_kwargs)
    raise TypeError(f"argument 'model' must be None, a model directory, a ChameleonModel or an "
                    f"Engine, got {type(model).__name__}")


def pick_task(task: str, has_images: bool, guidance: str) -> str:
    """``task="auto"``: text -> image without input images; with images, an edit when
    guidance is "cfg3", else image -> text."""
    if task != "auto":
        if task not in TASKS:
            raise ValueError(f"argument 'task' must be 'auto' or one of {TASKS}, got {task!r}")
        return task
    if not has_images:
        return "text_to_image"
    return "edit" if guidance == "cfg3" else "image_to_text"


def generate(prompt: str | list[Any], model: Any = None, images: list[Any] | None = None, *,
             task: str = "auto", suffix: str | list[Any] | None = None, bank: Any = None,
             k_docs: int | None = None, device: str | None = None,
             dtype: torch.dtype | str | None = None, processor: Any = None,
             scorer: Any = None, **sampling: Any) -> RequestOutput:
    """Generate for one prompt and return its :class:`RequestOutput`.

    Args:
        prompt: text, or an interleaved list of text and PIL images.
        model: model directory, ChameleonModel (give ``processor``), Engine, or None for the
            embedded default (``cm3rt/assets/default``), whose ``defaults.json`` then fills
            every setting not passed here: for text -> image, retrieval from its bank and
            classifier-free guidance (see :mod:`cm3rt.engine.defaults`).
        images: input images, placed before the prompt text (captioning, editing).
        task: "auto" or one of the request tasks (see :class:`Request`).
        suffix: infill only: the content after the masked span.
        bank, k_docs: retrieval memory bank and the documents to prepend. ``k_docs=None``:
            the default model's ``k_docs`` with the default model (its bank unless ``bank``
            is given), else 0; ``k_docs=0`` turns retrieval off.
        device, dtype: where / how to load a model directory (default CUDA bf16 when
            available, else CPU float32).
        scorer: best-of-n ranking for this call, ``scorer(prompt_text, images) -> scores``
            (e.g. ``cm3rt.retrieval.ClipEncoder(...).score``); default the engine's.
        **sampling: :class:`SamplingParams` fields (temperature, top_k, top_p, guidance,
            cfg_scale, cfg_image_scale, cd_alpha, cd_k, n, seed, max_new_tokens).

    Returns:
        The output: ``.images`` (PIL, best sample first), ``.text``, ``.samples``.

    Raises:
        ValueError / TypeError / FileNotFoundError for bad input; RuntimeError when
        generation fails (e.g. the sampler finds no valid token).
    """
    from cm3rt.engine.defaults import apply_defaults

    items: list[Any] = []
    if images is not None:
        if not isinstance(images, (list, tuple)):
            images = [images]
        items.extend(images)
    if isinstance(prompt, (list, tuple)):
        items.extend(prompt)
    else:
        items.append(prompt)
    has_images = any(not isinstance(x, str) for x in items)
    if model is None:
        from cm3rt.engine.defaults import load_defaults

        assets = load_defaults()
        guidance = sampling.get("guidance", assets.sampling.get("guidance", "none"))
        task = pick_task(task, has_images, guidance)
        sampling, bank, k_docs = apply_defaults(False, task, sampling, bank, k_docs, assets)
        model = assets.root
    else:
        sampling, bank, k_docs = apply_defaults(True, task, sampling, bank, k_docs)
    params = SamplingParams.from_kwargs(**sampling)
    task = pick_task(task, has_images, params.guidance)
    engine = get_engine(model, processor=processor, device=device, dtype=dtype)
    req = Request(prompt=items, task=task, params=params, suffix=suffix, bank=bank,
                  k_docs=k_docs)
    if scorer is not None and not callable(scorer):
        raise TypeError(f"argument 'scorer' must be callable, got {type(scorer).__name__}")
    saved = engine.scorer
    if scorer is not None:
        engine.scorer = scorer
    try:
        rid = engine.add_request(req)
        (out,) = engine.run_until_done([rid])
    finally:
        engine.scorer = saved
    return out.raise_for_error()
