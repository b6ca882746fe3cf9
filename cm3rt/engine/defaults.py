"""The embedded default assets (``cm3rt/assets/default``) and their generation defaults.

With no model given, ``cm3rt.generate`` and ``cm3rt generate`` / ``cm3rt caption`` use the
default directory and its ``defaults.json``: text -> image requests get retrieval (the
directory's bank, ``k_docs`` documents) and classifier-free guidance, unless the caller
passed those settings explicitly (``k_docs=0`` / ``--k-docs 0``, ``guidance="none"``, or
an explicit bank). With a model given nothing here applies.

``defaults.json`` (written by ``tools/train/package_default.py``)::

    {"format": "cm3rt-defaults", "version": 1,
     "guidance": "cfg", "cfg_scale": 3.0, "temperature": 1.0, "top_k": 0,
     "k_docs": 2, "bank": "bank",
     "caption": {"guidance": "none", "temperature": 0.0}}

``bank`` is relative to the directory (``null``: no default retrieval); ``caption`` holds
the sampling defaults of image -> text requests.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULTS_FILE = "defaults.json"
FORMAT = "cm3rt-defaults"
VERSION = 1
CLIP_DIR = "clip"
# Where the packaged default model lives; tests point this somewhere else.
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "assets" / "default"

# SamplingParams fields a defaults.json may set.
# (the CLI leaves exactly these unset when not given, so both paths read them alike)
_SAMPLING_KEYS = ("guidance", "cfg_scale", "temperature", "top_k", "top_p", "max_new_tokens")
_RETRIEVAL_TASKS = ("text_to_image",)

_LOCK = threading.Lock()
_BANKS: dict[tuple, Any] = {}


def default_model_dir() -> Path:
    """The embedded default model's directory (``cm3rt/assets/default``)."""
    return DEFAULT_DIR


@dataclass(frozen=True)
class DefaultAssets:
    """The default directory and what its defaults.json says."""

    root: Path
    sampling: dict[str, Any] = field(default_factory=dict)  # text -> image (and other tasks)
    caption: dict[str, Any] = field(default_factory=dict)  # image -> text
    k_docs: int = 0
    bank: str | None = None

    @property
    def bank_dir(self) -> Path | None:
        return None if self.bank is None else self.root / self.bank

    def sampling_for(self, task: str) -> dict[str, Any]:
        """Sampling defaults of ``task`` (captioning has its own)."""
        return dict(self.caption if task == "image_to_text" else self.sampling)


def _check_sampling(d: Any, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise TypeError(f"{where}: expected an object of sampling settings, got {d!r}")
    unknown = sorted(set(d) - set(_SAMPLING_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown sampling settings {unknown} (expected some of "
                         f"{list(_SAMPLING_KEYS)})")
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
    k_docs = d.get("k_docs", 0)
    if isinstance(k_docs, bool) or not isinstance(k_docs, int) or k_docs < 0:
        raise ValueError(f"default model: {path}: k_docs must be an int >= 0, got {k_docs!r}")
    bank = d.get("bank")
    if bank is not None and (not isinstance(bank, str)
                             or not (root / bank / "manifest.json").is_file()):
        raise FileNotFoundError(f"default model: {path} names bank {bank!r}, but "
                                    f"{root / str(bank)} is not a memory bank")
    sampling = _check_sampling({k: d[k] for k in _SAMPLING_KEYS if k in d}, str(path))
    caption = _check_sampling(d.get("caption", {}), f"{path}: caption")
    return DefaultAssets(root=root, sampling=sampling, caption=caption, k_docs=k_docs, bank=bank)


def open_default_bank(assets: DefaultAssets):
    """The default bank, opened once per process with the directory's own CLIP (``clip/``),
    so it never depends on where the bank was built."""
    from cm3rt.retrieval.bank import MemoryBank
    from cm3rt.retrieval.clip import ClipEncoder
    from cm3rt.retrieval.manifest import DATABASE, INDEX

    bank_dir = assets.bank_dir
    if bank_dir is None:
        raise ValueError(f"k_docs: the default model at {assets.root} ships no bank; pass "
                         "bank=<bank directory> (CLI: --bank DIR) or k_docs=0")
    bank_dir = bank_dir.resolve()
    stamps = tuple((bank_dir / f).stat().st_mtime_ns if (bank_dir / f).exists() else 0
                   for f in (DATABASE, INDEX))
    key = (str(bank_dir), stamps)
    with _LOCK:
        bank = _BANKS.get(key)
        if bank is None:
            clip = assets.root / CLIP_DIR
            if not (clip / "open_clip_config.json").is_file():
                raise FileNotFoundError(f"default model: the bank needs the CLIP in {clip}, "
                                        "which is missing (open_clip_config.json)")
            # text queries through ClipTextTower: a text -> image generate never imports
            # open_clip / torchvision / transformers (issue 7's start-up budget)
            encoder = ClipEncoder.for_queries(f"local-dir:{clip}")
            for old in [k for k in _BANKS if k[0] == key[0]]:
                _BANKS.pop(old).close()
            bank = _BANKS[key] = MemoryBank.open(bank_dir, encoder=encoder)
        return bank


def apply_defaults(model_given: bool, task: str, sampling: dict[str, Any], bank: Any,
                   k_docs: int | None, assets: DefaultAssets | None = None
                   ) -> tuple[dict[str, Any], Any, int]:
    """Fill what the caller left unset: -> (sampling kwargs, bank, k_docs).

    ``sampling`` holds only the settings the caller gave; ``k_docs=None`` means not given.
    With a model given: nothing is added and ``k_docs`` defaults to 0 (no retrieval).
    With the default model: its sampling defaults for ``task`` under the caller's, and for
    text -> image its bank with its ``k_docs`` (an explicit bank is used instead of the
    default one; ``k_docs=0`` turns retrieval off).
    """
    if k_docs is not None and (isinstance(k_docs, bool) or not isinstance(k_docs, int)
                               or k_docs < 0):
        raise ValueError(f"argument 'k_docs' must be an int >= 0, got {k_docs!r}")
    if model_given:
        return dict(sampling), bank, 0 if k_docs is None else k_docs
    assets = assets or load_defaults()
    merged = {**assets.sampling_for(task), **sampling}
    if k_docs is None:
        retrieval_task = task in _RETRIEVAL_TASKS
        k_docs = assets.k_docs if retrieval_task and (bank is not None or assets.bank) else 0
    if bank is None and k_docs > 0:
        bank = open_default_bank(assets)
    return merged, bank, k_docs
