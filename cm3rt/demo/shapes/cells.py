"""The default image tokenizer's code book: one code per cell, one code per cell content.

The default world puts at most one object, centred, in each of the 3 x 3 cells of a 48 px
image over a flat background, so a cell holds one of ``NUM_CELL_CODES`` contents:

    code = background_index * CODES_PER_BACKGROUND + content
    content 0                      empty cell
    content 1 + (colour * S + shape) * 2 + size   an object (S = number of shapes)

The image tokenizer (``tools/train/train_vqgan.py``, f = 16: one code per 16 px cell) is
trained to encode each cell to exactly this code, so the same object gives the same code in
every cell and every scene: the decoder's image tokens are a function of the caption, not of
the encoder's view of the whole image. (The first f = 8 tokenizer learnt its own codes; its
GroupNorm statistics span the image, and the same content took 3.9 nats of codes.)
"""

from __future__ import annotations

from cm3rt.demo.shapes.vocab import CELLS, COLOURS, GRID, SHAPES, SIZES, WORLD_BACKGROUNDS

_COLOURS = tuple(COLOURS)
_SIZES = tuple(SIZES)

CODES_PER_BACKGROUND = 1 + len(_COLOURS) * len(SHAPES) * len(_SIZES)
"""Contents of one cell over one background: empty, or colour x shape x size."""

NUM_CELL_CODES = len(WORLD_BACKGROUNDS) * CODES_PER_BACKGROUND
"""Size of the default tokenizer's code book (194)."""

CODES_PER_IMAGE = GRID * GRID
"""Image tokens of a default-world image (raster order over the cells)."""


def cell_code(background: str, obj=None) -> int:
    """The code of a cell over ``background`` holding ``obj`` (a SceneObject, or None)."""
    if background not in WORLD_BACKGROUNDS:
        raise ValueError(f"the default tokenizer codes the backgrounds {WORLD_BACKGROUNDS}, "
                         f"got {background!r}")
    base = WORLD_BACKGROUNDS.index(background) * CODES_PER_BACKGROUND
    if obj is None:
        return base
    if tuple(obj.offset) != (0.0, 0.0):
        raise ValueError(f"the default tokenizer codes centred objects, got offset {obj.offset}")
    c, s, z = _COLOURS.index(obj.colour), SHAPES.index(obj.shape), _SIZES.index(obj.size)
    return base + 1 + (c * len(SHAPES) + s) * len(_SIZES) + z


def scene_codes(scene) -> list[int]:
    """The ``CODES_PER_IMAGE`` codes of a default-world scene, cells in raster order."""
    if scene.texture != "plain":
        raise ValueError(f"the default tokenizer codes flat backgrounds, got {scene.texture!r}")
    by_cell = {tuple(o.cell): o for o in scene.objects}
    return [cell_code(scene.background, by_cell.get(cell)) for cell in CELLS]


def describe_code(code: int) -> str:
    """Human-readable content of a code ("red small star on black", "empty on white")."""
    if not isinstance(code, int) or not 0 <= code < NUM_CELL_CODES:
        raise ValueError(f"code must be an int in [0, {NUM_CELL_CODES}), got {code!r}")
    bg, content = divmod(code, CODES_PER_BACKGROUND)
    where = f"on {WORLD_BACKGROUNDS[bg]}"
    if content == 0:
        return f"empty {where}"
    rest, z = divmod(content - 1, len(_SIZES))
    c, s = divmod(rest, len(SHAPES))
    return f"{_SIZES[z]} {_COLOURS[c]} {SHAPES[s]} {where}"
