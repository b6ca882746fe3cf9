"""The closed vocabulary of the shapes world: shapes, colours, sizes, cells, backgrounds.

Everything the renderer can draw, the caption templates can say and the analyzer can read
back is listed here once, so the three stay in step.

Colours are chosen far apart in RGB (the closest pair, orange and yellow, is ~90 units
apart) and far from every background (>= ~95 units), so an image read back through a lossy
VQ autoencoder still classifies by nearest colour.
"""

from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
"""Shape names (singular, as the captions say them)."""

SHAPE_PLURALS: dict[str, str] = {s: ("crosses" if s == "cross" else s + "s") for s in SHAPES}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 225, 40),
    "green": (40, 160, 60),
    "cyan": (25, 185, 200),
    "blue": (35, 75, 215),
    "purple": (135, 55, 185),
    "pink": (240, 110, 180),
}
"""Object colours: name -> sRGB."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 236),
    "grey": (160, 160, 160),
    "black": (30, 30, 35),
    "beige": (225, 210, 175),
}
"""Background colours (unsaturated, so none is mistaken for an object colour)."""

TEXTURES: tuple[str, ...] = ("plain", "noise", "gradient")
"""Background textures: flat, faint per-pixel noise, faint vertical brightness ramp."""

IMAGE_SIZE = 48
"""Side in pixels of the default world's images: 3 x 3 cells of 16 px, each one code of the
f = 16 image tokenizer (9 codes an image, ``cells.py``), so an object centred in its cell is
one code, the same in every cell."""

WORLD_BACKGROUNDS: tuple[str, ...] = ("white", "black")
"""Backgrounds the default world draws (flat). The analyzer and the caption parser still
know every name of ``BACKGROUNDS``; two backgrounds keep the tokenizer's book of cell
contents (background x empty-or-colour x shape x size) at 194 codes."""

WORLD_TEXTURES: tuple[str, ...] = ("plain",)
"""Textures the default world draws: flat backgrounds only (a texture makes the same
object give different codes on different pixels)."""

SIZES: dict[str, float] = {"small": 0.17, "large": 0.28}
"""Object extent (side of its bounding box) as a fraction of the image side."""

GRID = 3
"""Objects sit on a GRID x GRID grid of cells; a cell is (row, col), (0, 0) the top left."""

CELLS: tuple[tuple[int, int], ...] = tuple((r, c) for r in range(GRID) for c in range(GRID))

CELL_WORDS: dict[tuple[int, int], str] = {
    (0, 0): "top left",
    (0, 1): "top",
    (0, 2): "top right",
    (1, 0): "left",
    (1, 1): "center",
    (1, 2): "right",
    (2, 0): "bottom left",
    (2, 1): "bottom",
    (2, 2): "bottom right",
}
"""The canonical position word of each cell ("top" is the top-middle cell)."""

RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of")
"""Relations between two objects. They are strict: "above" means the same column and a
smaller row; "left of" the same row and a smaller column."""

HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "diamond"),
        ("orange", "star"),
        ("yellow", "circle"),
        ("green", "cross"),
        ("cyan", "triangle"),
        ("blue", "square"),
        ("purple", "star"),
        ("pink", "circle"),
    }
)
"""(colour, shape) pairs never shown to the decoder in training, but present in the memory
bank: every colour and every shape is still seen in training, only these combinations are
new, which is what retrieval and compositional generalisation are measured on."""


def article(word: str) -> str:
    """'a' or 'an' for the word that follows."""
    return "an" if word[:1] in "aeiou" else "a"


NONCE_WORDS: tuple[str, ...] = (
    "dax", "wug", "blick", "toma", "fep", "zorp", "kiki", "bouba",
    "gazz", "tufa", "modi", "lorp", "nek", "zib", "pim", "vop",
)
"""Made-up object names for the decoder's novel-concept training episodes: in each such
sequence a nonce word names a colour x shape look chosen afresh, shown only in the retrieved
documents, so the decoder can draw it only by copying from them (retrieval has to pay in
training). Never used by the world's captions, the bank or the evaluation."""
