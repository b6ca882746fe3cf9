"""The embedded default assets (``cm3rt/assets/default``) and their generation defaults.

With no model given, every front door (``cm3rt.generate``, ``cm3rt generate`` /
``cm3rt caption``, the server) uses the default directory and its ``defaults.json``, through
:func:`cm3rt.api.resolve_request`: text -> image requests get retrieval (the directory's
bank, ``k_docs`` documents) and its guidance, captions get ``caption.k_docs`` documents
retrieved by the image, unless the caller passed those
settings explicitly (``k_docs=0`` / ``--k-docs 0``, ``guidance="none"``, or an explicit
bank). With a model given nothing here applies.

``defaults.json`` (written by ``tools/train/package_default.py``)::

    {"format": "cm3rt-defaults", "version": 1,
     "guidance": "cfg", "cfg_scale": 3.0, "temperature": 1.0, "top_k": 0,
     "k_docs": 2, "bank": "bank", "max_doc_score": null,
     "caption": {"guidance": "none", "temperature": 0.0, "k_docs": 2, "doc_sweep": true}}

``bank`` is relative to the directory (``null``: no default retrieval); ``max_doc_score``
(absent: RA-CM3's 0.9) is the retrieval rule dropping documents more similar to the query
than it, ``null`` turning it off (for every task); ``caption`` holds
the sampling defaults of image -> text requests and, as ``k_docs``, the documents retrieved
for a caption (the image is the query; absent: 0, no retrieval) and, as ``doc_sweep``
(absent: false), whether a caption is chosen among those with 0..k_docs documents by the
bank's CLIP (``Request.doc_sweep``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cm3rt.engine.request import check_max_doc_score
from cm3rt.retrieval.select import DEFAULT_MAX_SCORE

DEFAULTS_FILE = "defaults.json"
FORMAT = "cm3rt-defaults"
VERSION = 1
CLIP_DIR = "clip"
# Where the packaged default model lives; tests point this somewhere else.
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "assets" / "default"

# SamplingParams fields a defaults.json may set.
SAMPLING_KEYS = ("guidance", "cfg_scale", "temperature", "top_k", "top_p", "max_new_tokens",
                 "uncond_docs")


def default_model_dir() -> Path:
    """The embedded default model's directory (``cm3rt/assets/default``)."""
    return DEFAULT_DIR


@dataclass(frozen=True)
class DefaultAssets:
    """The default directory and what its defaults.json says."""

    root: Path
    sampling: dict[str, Any] = field(default_factory=dict)  # text -> image (and other tasks)
    caption: dict[str, Any] = field(default_factory=dict)  # image -> text
    k_docs: int = 0  # text -> image
    bank: str | None = None
    caption_k_docs: int = 0  # image -> text
    caption_doc_sweep: bool = False  # image -> text: best of 0..caption_k_docs documents
    max_doc_score: float | None = DEFAULT_MAX_SCORE  # retrieval rule, every task

    @property
    def bank_dir(self) -> Path | None:
        return None if self.bank is None else self.root / self.bank

    def k_docs_for(self, task: str) -> int:
        """Documents retrieved by default for ``task`` (text -> image and captioning)."""
        return {"text_to_image": self.k_docs, "image_to_text": self.caption_k_docs}.get(task, 0)

    def sampling_for(self, task: str) -> dict[str, Any]:
        """Sampling defaults of ``task`` (captioning has its own)."""
        return dict(self.caption if task == "image_to_text" else self.sampling)


def _check_sampling(d: Any, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise TypeError(f"{where}: expected an object of sampling settings, got {d!r}")
    unknown = sorted(set(d) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown sampling settings {unknown} (expected some of "
                         f"{list(SAMPLING_KEYS)})")
    return dict(d)


def load_defaults(root: str | Path | None = None) -> DefaultAssets:
    """Read the default directory (``root``, default :func:`default_model_dir`).

    Raises FileNotFoundError, naming what is missing and what to do, when the directory,
    its model or its defaults.json is absent; ValueError when defaults.json is malformed.
    """
    root = Path(root) if root is not None else default_model_dir()
    missing = [name for name in ("config.json", DEFAULTS_FILE) if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"no model given and the embedded default model is not installed: {root} lacks "
            f"{', '.join(missing)} (build it with tools/train/package_default.py, or pass "
            "model=<model directory> / --model DIR)")
    path = root / DEFAULTS_FILE
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"default model: {path} is not readable JSON: {e}") from e
    if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("version") != VERSION:
        raise ValueError(f"default model: {path} is not a {FORMAT} v{VERSION} file")
    k_docs = _check_k_docs(d.get("k_docs", 0), f"{path}: k_docs")
    bank = d.get("bank")
    if bank is not None and (not isinstance(bank, str)
                             or not (root / bank / "manifest.json").is_file()):
        raise FileNotFoundError(f"default model: {path} names bank {bank!r}, but "
                                    f"{root / str(bank)} is not a memory bank")
    sampling = _check_sampling({k: d[k] for k in SAMPLING_KEYS if k in d}, str(path))
    caption = d.get("caption", {})
    caption_k_docs, caption_doc_sweep = 0, False
    if isinstance(caption, dict):  # k_docs and doc_sweep are retrieval, the rest sampling
        caption = dict(caption)
        caption_k_docs = _check_k_docs(caption.pop("k_docs", 0), f"{path}: caption.k_docs")
        caption_doc_sweep = caption.pop("doc_sweep", False)
        if not isinstance(caption_doc_sweep, bool):
            raise TypeError(f"default model: {path}: caption.doc_sweep must be true or "
                            f"false, got {caption_doc_sweep!r}")
    caption = _check_sampling(caption, f"{path}: caption")
    try:
        max_doc_score = check_max_doc_score(d.get("max_doc_score", DEFAULT_MAX_SCORE))
    except ValueError as e:
        raise ValueError(f"default model: {path}: {e}") from None
    return DefaultAssets(root=root, sampling=sampling, caption=caption, k_docs=k_docs, bank=bank,
                         caption_k_docs=caption_k_docs, caption_doc_sweep=caption_doc_sweep,
                         max_doc_score=max_doc_score)


def _check_k_docs(k: Any, where: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"default model: {where} must be an int >= 0, got {k!r}")
    return k


def open_default_bank(assets: DefaultAssets):
    """The default bank (opened once per process, :func:`cm3rt.retrieval.bank.open_cached`)
    with the directory's own CLIP (``clip/``) for queries, so it never depends on where the
    bank was built. Queries go through the CLIP text and image towers, so neither a text ->
    image generate nor a caption imports open_clip / torchvision / transformers (start-up
    time)."""
    from cm3rt.retrieval.bank import open_cached

    bank_dir = assets.bank_dir
    if bank_dir is None:
        raise ValueError(f"k_docs: the default model at {assets.root} ships no bank; pass "
                         "bank=<bank directory> (CLI: --bank DIR) or k_docs=0")
    clip = assets.root / CLIP_DIR
    if not (clip / "open_clip_config.json").is_file():
        raise FileNotFoundError(f"default model: the bank needs the CLIP in {clip}, "
                                "which is missing (open_clip_config.json)")
    return open_cached(bank_dir, query_encoder=f"local-dir:{clip.resolve()}")
