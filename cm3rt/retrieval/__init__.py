"""Retrieval augmentation (RA-CM3 / CM3Leon): CLIP encoder, FAISS memory bank, selection.

Exports load lazily, so importing ``cm3rt.retrieval`` pulls in neither open_clip nor faiss.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ClipEncoder": "clip",
    "EncoderIdentity": "clip",
    "MemoryBank": "bank",
    "Document": "bank",
    "SelectionParams": "select",
    "select_documents": "select",
    "retrieve_prefix": "augment",
}

__all__ = [
    "ClipEncoder",
    "Document",
    "EncoderIdentity",
    "MemoryBank",
    "SelectionParams",
    "retrieve_prefix",
    "select_documents",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
