"""The procedural shapes world: seeded scene sampler, scene description and PIL renderer.

A scene is one or two flat objects (shape, colour, size) on a 3 x 3 grid of cells over a
background. The default world (``WorldConfig()``) centres objects in their cells over flat
white or black backgrounds and renders 48 px images, so each object lands on the image
tokenizer's code grid the same way in every cell; jitter, textures and the grey and beige
backgrounds are still there as options. Scenes render to a small image
and to captions (see ``cm3rt.demo.shapes.captions``); ``cm3rt.demo.shapes.analyzer`` reads an image
back into objects. Sampling is counter-based (``numpy.random.default_rng([seed, index])``)
so scene ``i`` of a seed is the same whatever else is sampled.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from PIL import Image

from cm3rt.demo.shapes.geometry import coverage
from cm3rt.demo.shapes.vocab import (
    BACKGROUNDS,
    CELLS,
    COLOURS,
    GRID,
    HELD_OUT_PAIRS,
    IMAGE_SIZE,
    SHAPES,
    SIZES,
    TEXTURES,
    WORLD_BACKGROUNDS,
    WORLD_TEXTURES,
)

Concepts = Literal["all", "train", "held_out"]

NOISE_AMPLITUDE = 6.0
"""Half-range of the 'noise' texture, in 8-bit levels (faint on purpose)."""

GRADIENT_AMPLITUDE = 10.0
"""Half-range of the 'gradient' texture's vertical ramp, in 8-bit levels."""


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene.

    Attributes:
        shape: one of ``SHAPES``.
        colour: one of ``COLOURS``.
        size: "small" or "large".
        cell: (row, col) on the 3 x 3 grid, (0, 0) top left.
        offset: (dx, dy) of the bounding-box centre from the cell centre, as fractions of
            the image side (small jitter that keeps the object inside its cell).
    """

    shape: str
    colour: str
    size: str
    cell: tuple[int, int]
    offset: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"SceneObject.shape must be one of {SHAPES}, got {self.shape!r}")
        if self.colour not in COLOURS:
            raise ValueError(
                f"SceneObject.colour must be one of {tuple(COLOURS)}, got {self.colour!r}"
            )
        if self.size not in SIZES:
            raise ValueError(f"SceneObject.size must be one of {tuple(SIZES)}, got {self.size!r}")
        try:
            cell = tuple(int(v) for v in self.cell)
        except (TypeError, ValueError):
            cell = None
        if cell not in CELLS:
            raise ValueError(
                f"SceneObject.cell must be (row, col) in 0..{GRID - 1}, got {self.cell!r}"
            )
        object.__setattr__(self, "cell", cell)
        try:
            off = tuple(float(v) for v in self.offset)
        except (TypeError, ValueError):
            off = ()
        if len(off) != 2 or max(abs(v) for v in off) > max_offset(self.size) + 1e-9:
            raise ValueError(
                f"SceneObject.offset must be 2 floats within +-{max_offset(self.size):.4f} "
                f"for size {self.size!r}, got {self.offset!r}"
            )
        object.__setattr__(self, "offset", off)

    def center(self, image_size: int) -> tuple[float, float]:
        """(x, y) of the bounding-box centre in pixels on an ``image_size`` canvas."""
        row, col = self.cell
        cell_side = image_size / GRID
        return (
            (col + 0.5) * cell_side + self.offset[0] * image_size,
            (row + 0.5) * cell_side + self.offset[1] * image_size,
        )

    def extent(self, image_size: int) -> float:
        """Side of the bounding box in pixels."""
        return SIZES[self.size] * image_size


def max_offset(size: str) -> float:
    """Largest jitter (fraction of the image side) that keeps >= 1 px (at 64 px) of
    background between objects of neighbouring cells."""
    margin = (1.0 / GRID - SIZES[size]) / 2  # free space each side of a centred object
    return max(0.0, margin - 1.0 / 64)


@dataclass(frozen=True)
class Scene:
    """A scene: 1-2 objects in distinct cells over a background.

    Attributes:
        objects: the objects, in no particular order.
        background: one of ``BACKGROUNDS``.
        texture: one of ``TEXTURES``.
        texture_seed: seeds the 'noise' texture (and the gradient's direction).
    """

    objects: tuple[SceneObject, ...]
    background: str = "white"
    texture: str = "plain"
    texture_seed: int = 0

    def __post_init__(self) -> None:
        objs = tuple(self.objects)
        if not objs or not all(isinstance(o, SceneObject) for o in objs):
            raise TypeError(
                f"Scene.objects must be a non-empty sequence of SceneObject, got {self.objects!r}"
            )
        cells = [o.cell for o in objs]
        if len(set(cells)) != len(cells):
            raise ValueError(f"Scene.objects must occupy distinct cells, got cells {cells}")
        object.__setattr__(self, "objects", objs)
        if self.background not in BACKGROUNDS:
            raise ValueError(
                f"Scene.background must be one of {tuple(BACKGROUNDS)}, got {self.background!r}"
            )
        if self.texture not in TEXTURES:
            raise ValueError(f"Scene.texture must be one of {TEXTURES}, got {self.texture!r}")

    def render(self, image_size: int = IMAGE_SIZE, supersample: int = 8) -> Image.Image:
        """Draw the scene as an RGB PIL image of ``image_size`` x ``image_size``."""
        return Image.fromarray(render_array(self, image_size, supersample), mode="RGB")

    def caption(self, rng: np.random.Generator | int | None = None) -> str:
        """A caption from a randomly chosen template (see ``captions.random_caption``)."""
        from cm3rt.demo.shapes.captions import random_caption

        return random_caption(self, rng)

    def describe(self) -> str:
        """The canonical, fully specified caption (every attribute and position)."""
        from cm3rt.demo.shapes.captions import describe

        return describe(self)

    def to_dict(self) -> dict:
        """JSON-friendly form (``Scene.from_dict`` inverts it)."""
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> Scene:
        """Rebuild a scene from ``Scene.to_dict``'s output."""
        objs = tuple(
            SceneObject(
                shape=o["shape"],
                colour=o["colour"],
                size=o["size"],
                cell=tuple(o["cell"]),
                offset=tuple(o.get("offset", (0.0, 0.0))),
            )
            for o in d["objects"]
        )
        return Scene(
            objects=objs,
            background=d.get("background", "white"),
            texture=d.get("texture", "plain"),
            texture_seed=int(d.get("texture_seed", 0)),
        )


def _background(scene: Scene, image_size: int) -> np.ndarray:
    bg = np.empty((image_size, image_size, 3), dtype=np.float32)
    bg[:] = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32)
    if scene.texture == "noise":
        rng = np.random.default_rng(scene.texture_seed)
        # Luminance-only noise: it changes brightness, never hue.
        bg += rng.uniform(-NOISE_AMPLITUDE, NOISE_AMPLITUDE, (image_size, image_size, 1))
    elif scene.texture == "gradient":
        ramp = np.linspace(-GRADIENT_AMPLITUDE, GRADIENT_AMPLITUDE, image_size, dtype=np.float32)
        if scene.texture_seed % 2:
            ramp = ramp[::-1]
        bg += ramp[:, None, None]
    return bg


def render_array(scene: Scene, image_size: int = IMAGE_SIZE, supersample: int = 8) -> np.ndarray:
    """Draw ``scene`` as uint8 [image_size, image_size, 3].

    Each object's antialiased coverage blends its colour linearly over the background
    (objects never overlap, their cells are distinct).
    """
    if not isinstance(scene, Scene):
        raise TypeError(f"scene must be a Scene, got {type(scene).__name__}")
    if not isinstance(image_size, int) or image_size < 24:
        raise ValueError(f"image_size must be an int >= 24, got {image_size!r}")
    if not isinstance(supersample, int) or not 1 <= supersample <= 16:
        raise ValueError(f"supersample must be an int in 1..16, got {supersample!r}")
    img = _background(scene, image_size)
    for obj in scene.objects:
        a = coverage(obj.shape, obj.center(image_size), obj.extent(image_size), image_size,
                     supersample)[..., None]
        img = img * (1.0 - a) + np.asarray(COLOURS[obj.colour], dtype=np.float32) * a
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class WorldConfig:
    """Distribution of sampled scenes.

    Attributes:
        p_two: chance of a two-object scene.
        p_aligned: in a two-object scene, chance the objects share a row or a column (so a
            relation word such as "above" describes them).
        concepts: "all" (any colour x shape), "train" (no held-out pair anywhere, for the
            decoder's training data), "held_out" (the first object is a held-out pair, for
            evaluation on unseen combinations).
        backgrounds: background names to draw from (default: the flat ``WORLD_BACKGROUNDS``).
        textures: texture names to draw from (default: plain only).
        jitter: scale (0..1) of the random offset within the cell (default 0: objects
            centred in their cells, aligned to the image tokenizer's code grid; 1 is the
            first world's random sub-cell offsets).
    """

    p_two: float = 0.5
    p_aligned: float = 0.6
    concepts: Concepts = "all"
    backgrounds: tuple[str, ...] = WORLD_BACKGROUNDS
    textures: tuple[str, ...] = WORLD_TEXTURES
    jitter: float = 0.0

    def __post_init__(self) -> None:
        for name in ("p_two", "p_aligned", "jitter"):
            v = getattr(self, name)
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"WorldConfig.{name} must be in [0, 1], got {v!r}")
        if self.concepts not in ("all", "train", "held_out"):
            raise ValueError(
                f"WorldConfig.concepts must be 'all', 'train' or 'held_out', got {self.concepts!r}"
            )
        if not self.backgrounds or any(b not in BACKGROUNDS for b in self.backgrounds):
            raise ValueError(
                f"WorldConfig.backgrounds must be a non-empty subset of {tuple(BACKGROUNDS)}, "
                f"got {self.backgrounds!r}"
            )
        if not self.textures or any(t not in TEXTURES for t in self.textures):
            raise ValueError(
                f"WorldConfig.textures must be a non-empty subset of {TEXTURES}, "
                f"got {self.textures!r}"
            )


def concept_pairs(kind: Literal["train", "held_out", "all"]) -> list[tuple[str, str]]:
    """The (colour, shape) pairs of a concept split, in a fixed order."""
    every = [(c, s) for c in COLOURS for s in SHAPES]
    if kind == "all":
        return every
    if kind == "train":
        return [p for p in every if p not in HELD_OUT_PAIRS]
    if kind == "held_out":
        return [p for p in every if p in HELD_OUT_PAIRS]
    raise ValueError(f"kind must be 'all', 'train' or 'held_out', got {kind!r}")


def uses_held_out(scene_or_objects) -> bool:
    """True if any object (of a Scene, or an iterable of objects with .colour and .shape)
    is a held-out colour x shape pair."""
    objs = scene_or_objects.objects if hasattr(scene_or_objects, "objects") else scene_or_objects
    return any((o.colour, o.shape) in HELD_OUT_PAIRS for o in objs)


def _aligned_cells(rng: np.random.Generator) -> tuple[tuple[int, int], tuple[int, int]]:
    line = int(rng.integers(GRID))
    a, b = rng.choice(GRID, size=2, replace=False)
    if rng.random() < 0.5:  # same row
        return (line, int(a)), (line, int(b))
    return (int(a), line), (int(b), line)


def _as_rng(seed: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None or isinstance(seed, (int, np.integer)):
        return np.random.default_rng(seed)
    raise TypeError(f"seed must be an int, a numpy Generator or None, got {type(seed).__name__}")


def sample_scene(seed: np.random.Generator | int | None = None,
                 config: WorldConfig | None = None) -> Scene:
    """Sample one scene.

    Args:
        seed: an int (reproducible), a numpy Generator (consumed), or None (fresh entropy).
        config: the scene distribution (defaults to ``WorldConfig()``).
    """
    cfg = WorldConfig() if config is None else config
    if not isinstance(cfg, WorldConfig):
        raise TypeError(f"config must be a WorldConfig, got {type(cfg).__name__}")
    rng = _as_rng(seed)
    n = 2 if rng.random() < cfg.p_two else 1
    if n == 2 and rng.random() < cfg.p_aligned:
        cells = list(_aligned_cells(rng))
    else:
        idx = rng.choice(len(CELLS), size=n, replace=False)
        cells = [CELLS[int(i)] for i in idx]

    first_pool = concept_pairs("held_out" if cfg.concepts == "held_out" else cfg.concepts)
    rest_pool = concept_pairs("train" if cfg.concepts == "train" else "all")
    objects = []
    for k, cell in enumerate(cells):
        pool = first_pool if k == 0 else rest_pool
        colour, shape = pool[int(rng.integers(len(pool)))]
        size = ("small", "large")[int(rng.integers(2))]
        lim = max_offset(size) * cfg.jitter
        dx, dy = rng.uniform(-lim, lim, size=2) if lim > 0 else (0.0, 0.0)
        objects.append(SceneObject(shape, colour, size, cell, (float(dx), float(dy))))
    order = rng.permutation(n)  # the held-out object is not always listed first
    background = cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))]
    texture = cfg.textures[int(rng.integers(len(cfg.textures)))]
    return Scene(
        objects=tuple(objects[int(i)] for i in order),
        background=background,
        texture=texture,
        texture_seed=int(rng.integers(2**31)),
    )


def scene_at(seed: int, index: int, config: WorldConfig | None = None) -> Scene:
    """Scene number ``index`` of stream ``seed`` (independent of any other index)."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    return sample_scene(np.random.default_rng([int(seed), int(index)]), config)
