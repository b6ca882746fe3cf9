"""cm3rt: a runtime for retrieval-augmented autoregressive multimodal models (CM3Leon family).

Submodules, top layer first (docs/DESIGN.md, "Python layers"):
    cm3rt.cli        the ``cm3rt`` command line (every subcommand)
    cm3rt.api        the one front door: generate(), load_engine(), resolve_request()
    cm3rt.engine     Engine (step loop), scheduler, model runner, paged KV cache, requests
    cm3rt.model      the Chameleon decoder, config and loading
    cm3rt.retrieval  CLIP encoder, FAISS + SQLite memory bank, document selection
    cm3rt.tokenizer  BPE text tokenizer, VQGAN image tokenizer, the interleaved processor
    cm3rt.checkpoint safetensors reading; cm3rt.devices: device / dtype resolution
    cm3rt.ops        kernel ops (paged attention, KV append, sampling, VQ lookup) over _C
    cm3rt.demo       the shapes world and the default model's evaluation (extra "eval")

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
    "generate": "cm3rt.api",
    "load_engine": "cm3rt.api",
    "load_model": "cm3rt.model",
    "load_pretrained": "cm3rt.model",
}

__all__ = [
    "Engine", "Request", "RequestOutput", "SamplingParams", "TokenPrompt",
    "generate", "load_engine", "load_model", "load_pretrained",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cm3rt' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
