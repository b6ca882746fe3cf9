"""The procedural "shapes" world the embedded default model is trained and evaluated on.

    world      Scene / SceneObject, seeded sampler (``sample_scene``, ``scene_at``), renderer
    captions   caption templates (``random_caption``, ``describe``) and ``parse_caption``
    analyzer   ``analyze(image)`` -> detected objects; ``matches`` / ``caption_matches``
    vocab      shapes, colours, sizes, cells, backgrounds, held-out colour x shape pairs
    cells      the default image tokenizer's code of each cell content (``scene_codes``)
"""

from cm3rt.demo.shapes.captions import (
    ObjectSpec,
    PromptSpec,
    Relation,
    describe,
    parse_caption,
    random_caption,
    spec_of_scene,
)
from cm3rt.demo.shapes.vocab import (
    BACKGROUNDS,
    CELL_WORDS,
    COLOURS,
    HELD_OUT_PAIRS,
    SHAPES,
    SIZES,
)
from cm3rt.demo.shapes.world import (
    Scene,
    SceneObject,
    WorldConfig,
    concept_pairs,
    render_array,
    sample_scene,
    scene_at,
    uses_held_out,
)

__all__ = [
    "BACKGROUNDS",
    "CELL_WORDS",
    "COLOURS",
    "HELD_OUT_PAIRS",
    "SHAPES",
    "SIZES",
    "ObjectSpec",
    "PromptSpec",
    "Relation",
    "Scene",
    "SceneObject",
    "WorldConfig",
    "concept_pairs",
    "describe",
    "parse_caption",
    "random_caption",
    "render_array",
    "sample_scene",
    "scene_at",
    "spec_of_scene",
    "uses_held_out",
]
