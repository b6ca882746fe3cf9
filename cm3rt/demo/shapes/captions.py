"""Captions of shapes-world scenes, and the parser that reads a prompt back into a spec.

``random_caption`` draws one of several templates ("a red circle", "a small blue star in
the top left", "a red star above a blue circle", "two green squares", "an image of ...
on a black background", ...); every caption it writes is true of its scene. ``describe``
writes the one canonical caption that names every attribute. ``parse_caption`` turns a
prompt into a ``PromptSpec``: the objects it asks for (each attribute it leaves out is
free), the relation between them and the background, which ``analyzer.matches`` checks an
image against.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np

from cm3rt.demo.shapes.vocab import (
    BACKGROUNDS,
    COLOURS,
    SHAPE_PLURALS,
    SHAPES,
    article,
)

# ---------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ObjectSpec:
    """One object a prompt asks for; None means the prompt does not say.

    Attributes:
        shape: one of ``SHAPES``.
        colour: one of ``COLOURS``.
        size: "small", "large" or None.
        cell: (row, col) or None.
    """

    shape: str
    colour: str
    size: str | None = None
    cell: tuple[int, int] | None = None


@dataclass(frozen=True)
class Relation:
    """A spatial relation between two objects of a spec, in canonical form.

    ``kind`` is "above" (first object above the second: same column, smaller row) or
    "left of" (same row, smaller column); "below" / "right of" are stored swapped.
    """

    kind: str
    first: int
    second: int


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for: objects (exactly these, no others), a relation, a background."""

    objects: tuple[ObjectSpec, ...]
    relation: Relation | None = None
    background: str | None = None


# ---------------------------------------------------------------------- phrase tables

# Position phrases a caption may use for each cell; the first is the canonical one.
_CELL_PHRASES: dict[tuple[int, int], tuple[str, ...]] = {
    (0, 0): ("in the top left", "in the top left corner", "at the top left"),
    (0, 1): ("at the top", "at the top center", "in the top middle"),
    (0, 2): ("in the top right", "in the top right corner", "at the top right"),
    (1, 0): ("on the left", "on the left side", "in the middle left"),
    (1, 1): ("in the center", "in the middle", "in the centre"),
    (1, 2): ("on the right", "on the right side", "in the middle right"),
    (2, 0): ("in the bottom left", "in the bottom left corner", "at the bottom left"),
    (2, 1): ("at the bottom", "at the bottom center", "in the bottom middle"),
    (2, 2): ("in the bottom right", "in the bottom right corner", "at the bottom right"),
}

# Relation phrases "A <phrase> B" -> (canonical kind, A is the canonical first object).
_RELATION_PHRASES: dict[str, tuple[str, bool]] = {
    "above": ("above", True),
    "over": ("above", True),
    "below": ("above", False),
    "under": ("above", False),
    "beneath": ("above", False),
    "to the left of": ("left of", True),
    "left of": ("left of", True),
    "to the right of": ("left of", False),
    "right of": ("left of", False),
}
_PHRASES_FOR: dict[tuple[str, bool], tuple[str, ...]] = {
    ("above", True): ("above", "over"),
    ("above", False): ("below", "under", "beneath"),
    ("left of", True): ("to the left of", "left of"),
    ("left of", False): ("to the right of", "right of"),
}

_PREFIXES = ("", "", "", "", "a picture of ", "an image of ", "a drawing of ",
             "a simple drawing of ", "there is ")
_SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large",
               "big": "large"}
_COLOUR_WORDS = {**{c: c for c in COLOURS}, "violet": "purple"}
_SHAPE_WORDS = {**{s: s for s in SHAPES}, "plus": "cross", "rhombus": "diamond"}
_BG_WORDS = {**{b: b for b in BACKGROUNDS}, "gray": "grey"}


def _alt(words) -> str:
    return "|".join(sorted((re.escape(w) for w in words), key=len, reverse=True))


_POS_RE = (r"(?:in|at|on)\s+the\s+(?P<pos>(?:(?:top|bottom|middle|center|centre)"
           r"(?:\s+(?:left|right|middle|center|centre))?)|left|right)"
           r"(?:\s+(?:corner|side|edge))?")
_OBJECT_RE = re.compile(
    r"\b(?:(?P<det>a|an|one|two|the)\s+)?"
    rf"(?:(?P<size>{_alt(_SIZE_WORDS)})\s+)?"
    rf"(?P<colour>{_alt(_COLOUR_WORDS)})\s+"
    rf"(?P<shape>{_alt(_SHAPE_WORDS)})(?:es|s)?\b"
    rf"(?:\s+{_POS_RE})?"
)
_BG_RE = re.compile(rf"\b(?:on|over|against)\s+an?\s+(?P<bg>{_alt(_BG_WORDS)})\s+background\b")
_REL_RE = re.compile(rf"\b(?P<rel>{_alt(_RELATION_PHRASES)})\b")

_ROW_WORDS = {"top": 0, "middle": 1, "center": 1, "centre": 1, "bottom": 2}
_COL_WORDS = {"left": 0, "middle": 1, "center": 1, "centre": 1, "right": 2}


def _cell_of(pos: str) -> tuple[int, int]:
    words = pos.split()
    if len(words) == 2:
        return (_ROW_WORDS[words[0]], _COL_WORDS[words[1]])
    w = words[0]
    if w in ("left", "right"):
        return (1, _COL_WORDS[w])
    return (_ROW_WORDS[w], 1)


# ------------------------------------------------------------------------- parsing


def parse_caption(text: str) -> PromptSpec:
    """Read a prompt of the shapes world into the objects, relation and background it asks for.

    Recognises "[a|an|one|two] [size] colour shape[s] [position]" object phrases, relation
    words between two of them ("above", "below", "to the left of", ...), and "on a <bg>
    background". Words it does not know ("a picture of", "and", "with") are ignored.

    Raises:
        TypeError: ``text`` is not a str.
        ValueError: ``text`` names no object (a colour followed by a shape).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    norm = " ".join(re.sub(r"[^a-z ]+", " ", text.lower()).split())
    background = None
    m = _BG_RE.search(norm)
    if m:
        background = _BG_WORDS[m.group("bg")]
        norm = (norm[: m.start()] + norm[m.end():]).strip()

    objects: list[ObjectSpec] = []
    spans: list[tuple[int, int, int]] = []  # (start, end, index of its first object)
    for m in _OBJECT_RE.finditer(norm):
        size = _SIZE_WORDS[m.group("size")] if m.group("size") else None
        cell = _cell_of(m.group("pos")) if m.group("pos") else None
        spec = ObjectSpec(_SHAPE_WORDS[m.group("shape")], _COLOUR_WORDS[m.group("colour")],
                          size, cell)
        spans.append((m.start(), m.end(), len(objects)))
        objects.extend([spec] * (2 if m.group("det") == "two" else 1))
    if not objects:
        raise ValueError(
            f"text must name at least one object as '<colour> <shape>' (colours "
            f"{tuple(COLOURS)}, shapes {SHAPES}), got {text!r}"
        )

    relation = None
    for (_, end_a, ia), (start_b, _, ib) in itertools.pairwise(spans):
        m = _REL_RE.search(norm[end_a:start_b])
        if m and relation is None:
            kind, forward = _RELATION_PHRASES[m.group("rel")]
            relation = Relation(kind, ia, ib) if forward else Relation(kind, ib, ia)
    return PromptSpec(tuple(objects), relation, background)


# ------------------------------------------------------------------------ writing


def _object_phrase(obj, *, with_size: bool, with_cell: bool, phrase_rng=None,
                   det: str | None = "a") -> str:
    words = ([obj.size] if with_size else []) + [obj.colour, obj.shape]
    head = " ".join(words)
    if det == "a":
        head = f"{article(head)} {head}"
    if with_cell:
        phrases = _CELL_PHRASES[obj.cell]
        pos = phrases[0] if phrase_rng is None else phrases[int(phrase_rng.integers(len(phrases)))]
        head = f"{head} {pos}"
    return head


def describe(scene) -> str:
    """The canonical caption naming every object's size, colour, shape and cell, and the
    background, e.g. "a small red star in the top left and a large blue circle at the
    bottom on a grey background". Objects are listed in reading order of their cells."""
    objs = sorted(scene.objects, key=lambda o: o.cell)
    body = " and ".join(_object_phrase(o, with_size=True, with_cell=True) for o in objs)
    return f"{body} on {article(scene.background)} {scene.background} background"


def relation_between(a, b) -> tuple[str, bool] | None:
    """(kind, a_first) of the strict relation between two objects with cells, or None when
    they share neither a row nor a column."""
    (ra, ca), (rb, cb) = a.cell, b.cell
    if ca == cb and ra != rb:
        return ("above", ra < rb)
    if ra == rb and ca != cb:
        return ("left of", ca < cb)
    return None


def random_caption(scene, rng: np.random.Generator | int | None = None) -> str:
    """One caption of ``scene`` from a randomly chosen template; always true of the scene.

    Templates: optional prefix ("a picture of", ...); per object optional size and
    position; for two objects "A <relation> B" (when they share a row or column), "A and B"
    / "A with B", or "two <colour> <shape>s" (when both are the same colour and shape);
    optional "on a <bg> background".
    """
    r = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    prefix = _PREFIXES[int(r.integers(len(_PREFIXES)))]
    suffix = ""
    if r.random() < 0.25:
        suffix = f" on {article(scene.background)} {scene.background} background"
    objs = list(scene.objects)

    if len(objs) == 1:
        (o,) = objs
        det = None if (not prefix and r.random() < 0.1) else "a"
        body = _object_phrase(o, with_size=r.random() < 0.4, with_cell=r.random() < 0.5,
                              phrase_rng=r, det=det)
        return f"{prefix}{body}{suffix}"

    a, b = (objs[0], objs[1]) if r.random() < 0.5 else (objs[1], objs[0])
    with_size = r.random() < 0.4
    if a.shape == b.shape and a.colour == b.colour and r.random() < 0.5:
        size = f"{a.size} " if (with_size and a.size == b.size) else ""
        return f"{prefix}two {size}{a.colour} {SHAPE_PLURALS[a.shape]}{suffix}"
    rel = relation_between(a, b)
    if rel is not None and r.random() < 0.6:
        phrases = _PHRASES_FOR[rel]
        word = phrases[int(r.integers(len(phrases)))]
        pa = _object_phrase(a, with_size=with_size, with_cell=False)
        pb = _object_phrase(b, with_size=with_size, with_cell=False)
        return f"{prefix}{pa} {word} {pb}{suffix}"
    with_cell = r.random() < 0.5
    pa = _object_phrase(a, with_size=with_size, with_cell=with_cell, phrase_rng=r)
    pb = _object_phrase(b, with_size=with_size, with_cell=with_cell, phrase_rng=r)
    joiner = " and " if r.random() < 0.8 else " with "
    return f"{prefix}{pa}{joiner}{pb}{suffix}"


def spec_of_scene(scene) -> PromptSpec:
    """The fully specified PromptSpec of a scene (what ``parse_caption(describe(scene))``
    must return, up to object order)."""
    objs = tuple(ObjectSpec(o.shape, o.colour, o.size, o.cell)
                 for o in sorted(scene.objects, key=lambda o: o.cell))
    return PromptSpec(objs, None, scene.background)


__all__ = [
    "ObjectSpec",
    "PromptSpec",
    "Relation",
    "describe",
    "parse_caption",
    "random_caption",
    "relation_between",
    "spec_of_scene",
]
