"""cm3rt: a runtime for retrieval-augmented autoregressive multimodal models (CM3Leon family).

Submodules:
    cm3rt.ops        kernel ops (paged attention, KV append, sampling, VQ lookup)
    cm3rt.model      the Chameleon decoder, config and checkpoint loading
    cm3rt.tokenizer  VQGAN image tokenizer, BPE text tokenizer, interleaved processor
    cm3rt.engine     paged KV cache, continuous batching scheduler, Engine
    cm3rt.retrieval  CLIP encoder, FAISS + SQLite memory bank, document selection
    cm3rt.shapes     procedural shapes world: scenes, renderer, captions, analyzer

The top-level names below are imported lazily, so `import cm3rt` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Engine": "cm3rt.engine",
    "SamplingParams": "cm3rt.engine",
    "Request": "cm3rt.engine",
    "TokenPrompt": "cm3rt.engine",
    "RequestOutput": "cm3rt.engine",
    "generate": "cm3rt.engine.generate",
    "load_model": "cm3rt.model",
    "load_pretrained": "cm3rt.model",
}

__all__ = [
    "Engine", "Request", "RequestOutput", "SamplingParams", "TokenPrompt",
    "generate", "load_model", "load_pretrained",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cm3rt' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
