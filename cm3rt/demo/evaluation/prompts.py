"""Deterministic evaluation prompt sets, drawn from the shapes world itself.

Nothing is read from disk: every set is a pure function of (seed, index), so ``cm3rt eval``
gives the same prompts on a fresh machine without the training data folder.

Each set has its own seed stream, ``numpy.random.default_rng([seed, STREAM, index])``, with
stream tags that no training script uses (they draw from ``[seed, index]`` /
``[seed, split, index]``), so item ``i`` of a set never changes when N changes.

    held_out_prompts(n, seed)  first object of every scene is a held-out colour x shape pair
                               (``HELD_OUT_PAIRS``): a combination the decoder never saw
    train_prompts(n, seed)     no held-out pair anywhere: the concepts of training (ceiling)
    caption_scenes(n, seed)    any concepts, for the image -> text (captioning) accuracy
    infill_items(n, seed)      a render and its canonical caption with 1-3 words masked (CM3)
    edit_items(n, seed)        a one-object render, "make the <shape> <colour>" and the scene
                               the edit should give (train concepts only)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from cm3rt.demo.shapes import (
    COLOURS,
    HELD_OUT_PAIRS,
    Scene,
    SceneObject,
    WorldConfig,
    describe,
    random_caption,
    sample_scene,
)
from cm3rt.demo.shapes.analyzer import matches
from cm3rt.demo.shapes.captions import parse_caption

# Seed-stream tags (arbitrary constants, distinct from the training splits' small ints).
HELD_OUT_STREAM = 0xE7A1_0001
TRAIN_STREAM = 0xE7A1_0002
CAPTION_STREAM = 0xE7A1_0003
INFILL_STREAM = 0xE7A1_0004
EDIT_STREAM = 0xE7A1_0005

_MAX_TRIES = 64


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt.

    Attributes:
        index: position in its set (also keys the generation seed).
        text: the prompt, a caption from the world's templates (true of ``scene``).
        scene: the scene the caption was written from (one of the images it describes).
        held_out: whether the prompt names a held-out colour x shape pair.
    """

    index: int
    text: str
    scene: Scene
    held_out: bool


def _check_n(n: int, name: str = "n") -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"argument '{name}' must be an int >= 0, got {n!r}")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"argument 'seed' must be an int >= 0, got {seed!r}")


def names_held_out(text: str) -> bool:
    """Whether the prompt, as the parser reads it, asks for a held-out colour x shape pair."""
    return any((o.colour, o.shape) in HELD_OUT_PAIRS for o in parse_caption(text).objects)


def _prompt(seed: int, stream: int, index: int, concepts: str) -> EvalPrompt:
    rng = np.random.default_rng([int(seed), stream, int(index)])
    config = WorldConfig(concepts=concepts)
    for _ in range(_MAX_TRIES):
        scene = sample_scene(rng, config)
        text = random_caption(scene, rng)
        spec = parse_caption(text)
        held = any((o.colour, o.shape) in HELD_OUT_PAIRS for o in spec.objects)
        # The prompt must say what its set is about (a held-out prompt must name the
        # held-out pair; a train prompt none) and be satisfiable by its own scene.
        if held == (concepts == "held_out") and matches(spec, scene.objects,
                                                        background=scene.background):
            return EvalPrompt(int(index), text, scene, held)
    raise RuntimeError(f"no valid {concepts} prompt for seed {seed}, index {index} "
                       f"after {_MAX_TRIES} draws (caption templates out of step?)")


def held_out_prompts(n: int, seed: int = 0) -> list[EvalPrompt]:
    """``n`` prompts whose scene's first object is a held-out colour x shape pair.

    The caption is one of the world's random templates; it always names every object, so
    the held-out pair is in the prompt text (checked by parsing it back).
    """
    _check_n(n)
    _check_seed(seed)
    return [_prompt(seed, HELD_OUT_STREAM, i, "held_out") for i in range(n)]


def train_prompts(n: int, seed: int = 0) -> list[EvalPrompt]:
    """``n`` prompts with no held-out pair anywhere (concepts seen in training)."""
    _check_n(n)
    _check_seed(seed)
    return [_prompt(seed, TRAIN_STREAM, i, "train") for i in range(n)]


def caption_scenes(n: int, seed: int = 0) -> list[Scene]:
    """``n`` fresh scenes (any concepts) to render and caption."""
    _check_n(n)
    _check_seed(seed)
    return [sample_scene(np.random.default_rng([int(seed), CAPTION_STREAM, i]),
                         WorldConfig(concepts="all"))
            for i in range(n)]


@dataclass(frozen=True)
class InfillItem:
    """A masked caption span: the model sees ``image pre <mask> post <infill>`` and must
    write ``span`` (the words of the canonical caption ``pre + span + post``)."""

    scene: Scene
    pre: str
    span: str
    post: str


def infill_items(n: int, seed: int = 0) -> list[InfillItem]:
    """``n`` fresh scenes (any concepts), each with 1-3 consecutive words of its canonical
    caption (``describe``) masked, as the decoder's CM3 infill sequences are built."""
    _check_n(n)
    _check_seed(seed)
    items = []
    for i in range(n):
        rng = np.random.default_rng([int(seed), INFILL_STREAM, i])
        scene = sample_scene(rng, WorldConfig(concepts="all"))
        words = describe(scene).split(" ")
        span = int(rng.integers(1, min(3, len(words)) + 1))
        start = int(rng.integers(0, len(words) - span + 1))
        pre = " ".join(words[:start]) + (" " if start else "")
        post = (" " if start + span < len(words) else "") + " ".join(words[start + span:])
        items.append(InfillItem(scene, pre, " ".join(words[start:start + span]), post))
    return items


@dataclass(frozen=True)
class EditItem:
    """A text-guided edit: ``instruction`` applied to ``scene`` should draw ``target``."""

    scene: Scene
    instruction: str
    target: Scene


def recolour(obj: SceneObject, rng: np.random.Generator) -> tuple[SceneObject, str]:
    """``obj`` in another colour drawn by ``rng`` that keeps it a train concept, and the
    instruction asking for it ("make the star blue"): the edit the eval scores and the
    default decoder trains on (``tools/train/train_decoder.py``)."""
    colours = [c for c in COLOURS if c != obj.colour and (c, obj.shape) not in HELD_OUT_PAIRS]
    colour = colours[int(rng.integers(len(colours)))]
    return replace(obj, colour=colour), f"make the {obj.shape} {colour}"


def edit_items(n: int, seed: int = 0) -> list[EditItem]:
    """``n`` one-object scenes of train concepts with a recolouring instruction ("make the
    star blue") whose result is a train concept too; everything else must stay."""
    _check_n(n)
    _check_seed(seed)
    items = []
    config = WorldConfig(p_two=0.0, concepts="train")
    for i in range(n):
        rng = np.random.default_rng([int(seed), EDIT_STREAM, i])
        scene = sample_scene(rng, config)
        (obj,) = scene.objects
        new, instruction = recolour(obj, rng)
        items.append(EditItem(scene, instruction, replace(scene, objects=(new,))))
    return items
