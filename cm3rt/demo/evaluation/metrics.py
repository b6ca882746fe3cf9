"""The two scores of ``cm3rt eval``: prompt adherence of an image, correctness of a caption.

Both read images with the world's analyzer (``cm3rt.demo.shapes.analyzer``) and prompts with the
world's parser (``cm3rt.demo.shapes.captions.parse_caption``); neither looks at the model.
"""

from __future__ import annotations

import math

from cm3rt.demo.shapes import Scene, parse_caption
from cm3rt.demo.shapes.analyzer import analyze_scene, matches


def adheres(prompt: str, image) -> bool:
    """Whether ``image`` shows what ``prompt`` asks for.

    The analyzer's reading of the image must pair one-to-one with the prompt's objects
    (none missing, none extra), every attribute the prompt names (colour, shape, and size /
    position where given) must agree, a relation it names must hold, and a background it
    names must be the image's (``cm3rt.demo.shapes.analyzer.matches``). A missing image (the
    generation failed) does not adhere.
    """
    if image is None:
        return False
    return matches(parse_caption(prompt), analyze_scene(image))


def caption_correct(caption: str, scene: Scene) -> bool:
    """Whether a generated caption is a true and complete description of ``scene``.

    The rule, precisely: the caption is parsed with ``parse_caption``; it is correct iff
      * it parses (names at least one "<colour> <shape>"; anything else is wrong), and
      * its objects pair one-to-one with the scene's objects: it names every object of the
        scene and no other ("two red circles" counts two), each with the object's colour
        and shape, and
      * every optional attribute it states is true: the size and position of each object
        where it gives them, the relation between the two objects ("above", "left of", ...)
        where it gives one, the background where it names one.
    Attributes the caption leaves out are not required (the world's own captions leave
    size, position and background out most of the time).
    """
    if not isinstance(scene, Scene):
        raise TypeError(f"argument 'scene' must be a Scene, got {type(scene).__name__}")
    if not isinstance(caption, str):
        raise TypeError(f"argument 'caption' must be a str, got {type(caption).__name__}")
    try:
        spec = parse_caption(caption)
    except ValueError:
        return False
    return matches(spec, scene.objects, background=scene.background)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (``(0, 1)`` when ``n == 0``)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))
