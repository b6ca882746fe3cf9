"""Quality evaluation of shapes-world models (used by ``cm3rt eval`` in ``cm3rt/cli/eval.py``
and by ``bench/quality.py``).

    prompts   deterministic prompt sets: held-out concepts, train concepts, scenes to caption
    metrics   ``adheres(prompt, image)``, ``caption_correct(caption, scene)``
    quality   ``run_quality(engine, bank, QualityConfig(...))`` -> report; ``format_report``
"""

import importlib
from typing import Any

# Exported names -> their module, imported on first use: importing the package costs
# nothing until a name is used (the analyzer imports scipy).
_LAZY = {
    "adheres": "metrics", "caption_correct": "metrics", "wilson_interval": "metrics",
    "EvalPrompt": "prompts", "caption_scenes": "prompts", "held_out_prompts": "prompts",
    "names_held_out": "prompts", "train_prompts": "prompts",
    "QualityConfig": "quality", "QualityReport": "quality", "Setting": "quality",
    "evaluate_targets": "quality", "format_report": "quality", "run_quality": "quality",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cm3rt.demo.evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(f"cm3rt.demo.evaluation.{module}"), name)


__all__ = [
    "EvalPrompt",
    "QualityConfig",
    "QualityReport",
    "Setting",
    "adheres",
    "caption_correct",
    "caption_scenes",
    "evaluate_targets",
    "format_report",
    "held_out_prompts",
    "names_held_out",
    "run_quality",
    "train_prompts",
    "wilson_interval",
]
