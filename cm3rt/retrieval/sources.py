"""Reading a bank's source: a folder of images + same-stem .txt captions, or a JSONL file.

Each source document gets a stable key (its path relative to the folder, or
``NAME.jsonl#LINE``), so a resumed build skips what the bank already holds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class SourceDoc:
    """One document to add: a caption, an image file, or both."""

    key: str
    caption: str | None
    image: Path | None

    @property
    def modality(self) -> str:
        if self.caption is not None and self.image is not None:
            return "image+text"
        return "image" if self.image is not None else "text"


def _caption(text: str | None) -> str | None:
    if text is None:
        return None
    text = text.strip()
    return text or None


def _read_text(path: Path) -> str | None:
    try:
        return _caption(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"source: caption file {path} is not UTF-8 text: {e}") from e


def _from_folder(root: Path) -> Iterator[SourceDoc]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    image_stems = {p.with_suffix("") for p in images}
    for p in images:
        txt = p.with_suffix(".txt")
        caption = _read_text(txt) if txt.is_file() else None
        yield SourceDoc(str(p.relative_to(root)), caption, p)
    for p in files:
        if p.suffix == ".txt" and p.with_suffix("") not in image_stems:
            caption = _read_text(p)
            if caption is not None:
                yield SourceDoc(str(p.relative_to(root)), caption, None)


def _from_jsonl(path: Path) -> Iterator[SourceDoc]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"source: {where} is not valid JSON: {e}") from e
            if not isinstance(row, dict):
                raise TypeError(f"source: {where}: expected a JSON object, got "
                                 f"{type(row).__name__}")
            text, image = row.get("text"), row.get("image")
            if text is not None and not isinstance(text, str):
                raise ValueError(f"source: {where}: 'text' must be a string, got {text!r}")
            if image is not None and not isinstance(image, str):
                raise ValueError(f"source: {where}: 'image' must be a path string, got {image!r}")
            caption = _caption(text)
            image_path = None
            if image:
                image_path = Path(image)
                if not image_path.is_absolute():
                    image_path = path.parent / image_path
            if caption is None and image_path is None:
                raise ValueError(f"source: {where}: expected a non-empty 'text' or an 'image', "
                                 "got neither")
            yield SourceDoc(f"{path.name}#{lineno}", caption, image_path)


def read_source(source: str | Path) -> list[SourceDoc]:
    """All documents of a source folder or JSONL file, in a stable order."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"source: {path} does not exist")
    if path.is_dir():
        return list(_from_folder(path))
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        return list(_from_jsonl(path))
    raise ValueError(f"source: expected a folder of images/captions or a .jsonl file, got {path}")


def check_image(path: Path) -> None:
    """Raise a clear error unless ``path`` is a readable image (checked before any write)."""
    if not path.is_file():
        raise FileNotFoundError(f"source: image file {path} does not exist")
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"source: image file {path} is not a readable image: {e}") from e


def load_image(path: Path) -> Image.Image:
    """Decode an image file (mode kept: the tokenizers handle transparency their own way)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"source: image file {path} is not a readable image: {e}") from e
