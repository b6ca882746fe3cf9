"""Quality evaluation of shapes-world models (``cm3rt eval``, ``bench/quality.py``).

    prompts   deterministic prompt sets: held-out concepts, train concepts, scenes to caption
    metrics   ``adheres(prompt, image)``, ``caption_correct(caption, scene)``
    quality   ``run_quality(engine, bank, QualityConfig(...))`` -> report; ``format_report``
    cli       the ``eval`` subcommand (``register_cli``)
"""

from cm3rt.evaluation.metrics import adheres, caption_correct, wilson_interval
from cm3rt.evaluation.prompts import (
    EvalPrompt,
    caption_scenes,
    held_out_prompts,
    names_held_out,
    train_prompts,
)
from cm3rt.evaluation.quality import (
    QualityConfig,
    QualityReport,
    Setting,
    evaluate_targets,
    format_report,
    run_quality,
)

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
