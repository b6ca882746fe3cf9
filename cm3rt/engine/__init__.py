"""Generation engine: paged KV cache manager, continuous-batching scheduler, guided
sampling streams (CFG / CFG3 / CD-K) and the request / output types.

    engine = Engine(model, processor)
    outs = engine.generate([Request("a red circle", params=SamplingParams(guidance="cfg"))])

The one-call front door above it is :mod:`cm3rt.api` (``cm3rt.generate``).
"""

from cm3rt.engine.engine import Engine, SamplingError
from cm3rt.engine.kv_cache import BlockPool, CacheStats, KVCacheManager
from cm3rt.engine.params import GUIDANCE_MODES, SamplingParams, group_seed
from cm3rt.engine.request import (
    TASKS,
    Request,
    RequestOutput,
    SampleOutput,
    TokenEvent,
    TokenPrompt,
)
from cm3rt.engine.scheduler import CacheTooSmallError, Scheduler
from cm3rt.engine.state import VocabInfo

__all__ = [
    "GUIDANCE_MODES",
    "TASKS",
    "BlockPool",
    "CacheStats",
    "CacheTooSmallError",
    "Engine",
    "KVCacheManager",
    "Request",
    "RequestOutput",
    "SampleOutput",
    "SamplingError",
    "SamplingParams",
    "Scheduler",
    "TokenEvent",
    "TokenPrompt",
    "VocabInfo",
    "group_seed",
]
