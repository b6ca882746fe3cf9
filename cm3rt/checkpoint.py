"""Reading safetensors checkpoints (single file or HF-sharded) tensor by tensor.

Loading is two-phase so that a bad checkpoint never leaves a half-filled model behind:

1. :meth:`SafetensorsCheckpoint.check` reads only the headers and verifies that every
   tensor the model needs is present with the expected shape and a floating dtype;
2. :meth:`SafetensorsCheckpoint.copy_into` copies each tensor into its (pre-allocated)
   destination. safetensors memory-maps the file, so a source tensor is a view of the
   page cache and ``copy_`` converts dtype on the fly: the only resident copy of the
   weights is the model's own (no full state dict in between).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import final

import torch
from safetensors import SafetensorError, safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype tags that hold real numbers a weight can be converted from.
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor a model needs: its checkpoint name, whole shape, and where it goes.

    ``index`` (one slice per leading dim) reads only part of it, e.g. a tensor-parallel
    rank's rows or columns: the slice is read from the file, never the whole tensor.
    """

    name: str
    shape: tuple[int, ...]
    dest: torch.Tensor | None = None  # a view into the model's parameter (None: check only)
    index: tuple[slice, ...] = ()


@final
class SafetensorsCheckpoint:
    """The tensors of one or more ``.safetensors`` files, addressed by name.

    Use as a context manager (files stay memory-mapped while it is open).
    """

    def __init__(self, files: dict[str, Path]) -> None:
        """``files``: tensor name -> file holding it (see :meth:`open_dir`, :meth:`open_file`)."""
        self._where = files
        self._handles: dict[Path, object] = {}

    # ------------------------------------------------------------------ opening
    @classmethod
    def open_file(cls, path: str | Path) -> SafetensorsCheckpoint:
        """A single safetensors file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint: no such file: {path}")
        ckpt = cls({})
        names = ckpt._handle(path).keys()
        ckpt._where = dict.fromkeys(names, path)
        return ckpt

    @classmethod
    def open_dir(cls, directory: str | Path, single: str = SINGLE_FILE,
                 index: str = INDEX_FILE) -> SafetensorsCheckpoint:
        """An HF model directory: ``model.safetensors`` or a sharded index + its shards."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"checkpoint: no such directory: {directory}")
        index_path = directory / index
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"checkpoint: {index_path} is not a safetensors index "
                                 f"(expected a JSON object with 'weight_map'): {exc}") from exc
            files: dict[str, Path] = {}
            for name, shard in weight_map.items():
                shard_path = directory / shard
                if not shard_path.is_file():
                    raise FileNotFoundError(
                        f"checkpoint: shard {shard_path} (listed in {index_path} for "
                        f"tensor '{name}') does not exist")
                files[name] = shard_path
            ckpt = cls(files)
            for shard_path in sorted(set(files.values())):
                ckpt._handle(shard_path)  # open (and so validate) every shard up front
            return ckpt
        if (directory / single).is_file():
            return cls.open_file(directory / single)
        raise FileNotFoundError(
            f"checkpoint: {directory} holds neither {single} nor {index}")

    def _handle(self, path: Path):
        h = self._handles.get(path)
        if h is None:
            try:
                h = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as exc:
                raise ValueError(f"checkpoint: {path} is not a readable safetensors file: "
                                 f"{exc}") from exc
            self._handles[path] = h
        return h

    def close(self) -> None:
        """Release the memory maps."""
        self._handles.clear()

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ queries
    def names(self) -> list[str]:
        """All tensor names, sorted."""
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def files(self) -> list[Path]:
        """The files this checkpoint reads, sorted."""
        return sorted(set(self._where.values()) | set(self._handles))

    def file_of(self, name: str) -> Path:
        """The file holding tensor ``name``."""
        return self._where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape from the header (no data read)."""
        return tuple(self._handle(self._where[name]).get_slice(name).get_shape())

    def dtype_tag(self, name: str) -> str:
        """safetensors dtype tag from the header (``F32``, ``BF16``, ``I64`` ...)."""
        return self._handle(self._where[name]).get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        """The tensor (a view of the memory-mapped file; copy before modifying)."""
        return self._handle(self._where[name]).get_tensor(name)

    # ------------------------------------------------------------------ loading
    def check(self, specs: Iterable[TensorSpec], what: str = "checkpoint") -> None:
        """Verify presence, shape and dtype of every spec; raise ValueError listing the first
        problems (tensor name, file, expected and found) before anything is copied."""
        problems: list[str] = []
        missing: list[str] = []
        for spec in specs:
            if spec.name not in self._where:
                missing.append(spec.name)
                continue
            shape, tag = self.shape(spec.name), self.dtype_tag(spec.name)
            where = self._where[spec.name]
            if shape != tuple(spec.shape):
                problems.append(f"tensor '{spec.name}' in {where} has shape {list(shape)}, "
                                f"expected {list(spec.shape)}")
            if tag not in FLOAT_DTYPES:
                problems.append(f"tensor '{spec.name}' in {where} has dtype {tag}, "
                                f"expected a floating type ({', '.join(sorted(FLOAT_DTYPES))})")
        if missing:
            files = sorted({str(p) for p in self._where.values()})
            problems.insert(0, f"{len(missing)} tensor(s) missing from {files}: "
                               f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if problems:
            raise ValueError(f"{what}: " + "; ".join(problems[:8])
                             + (f"; and {len(problems) - 8} more" if len(problems) > 8 else ""))

    def copy_into(self, specs: Iterable[TensorSpec]) -> None:
        """Copy each spec's tensor (or its ``index`` part, through safetensors'
        ``get_slice``) into ``spec.dest`` (dtype/device converted by copy_)."""
        for spec in specs:
            if spec.dest is None:
                continue
            if spec.index:
                src = self._handle(self._where[spec.name]).get_slice(spec.name)[spec.index]
            else:
                src = self.get(spec.name)
            with torch.no_grad():
                spec.dest.copy_(src)
