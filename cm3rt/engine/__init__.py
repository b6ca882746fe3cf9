"""Generation engine: paged KV cache manager, continuous-batching scheduler, guided
sampling streams (CFG / CFG3 / CD-K) and the request / output types.

    engine = Engine(model, processor)
    outs = engine.generate([Request("a red circle", params=SamplingParams(guidance="cfg"))])

The one-call front door above it is :mod:`cm3rt.api` (``cm3rt.generate``).
"""

from __future__ import annotations

import importlib
from typing import Any

# Exported names -> their module, imported on first use: the parameter and request types
# (params, request) stay importable without torch, for the CLI's argument parser.
_EXPORTS = {
    "Engine": "engine", "EngineConfig": "config", "SamplingError": "scheduler",
    "BlockPool": "kv_cache", "CacheStats": "kv_cache", "KVCacheManager": "kv_cache",
    "GUIDANCE_MODES": "params", "SamplingParams": "params", "group_seed": "params",
    "TASKS": "request", "Request": "request", "RequestOutput": "request",
    "SampleOutput": "request", "TokenEvent": "request", "TokenPrompt": "request",
    "CacheTooSmallError": "scheduler", "Scheduler": "scheduler", "VocabInfo": "state",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
