"""Shape outlines and their antialiased coverage masks (drawn with PIL, box-filtered).

Every shape is defined in a unit box [-0.5, 0.5]^2 (y down) centred on its bounding box, so
an object is fully described by its shape, its bounding-box centre and its extent (the side
of the box it is inscribed in). Coverage is drawn by PIL on a supersampled canvas and
box-filtered down, so each output pixel holds the fraction of it the shape covers; the
renderer blends colours linearly with it, which is what lets the analyzer invert the blend.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from PIL import Image, ImageDraw

from cm3rt.demo.shapes.vocab import SHAPES

STAR_INNER_RATIO = 0.45
"""Inner / outer radius of the five-pointed star (0.38 is the classic pentagram; fatter
arms survive a 64 px canvas and a VQ autoencoder better)."""

CROSS_ARM_WIDTH = 0.36
"""Width of the plus sign's arms as a fraction of its extent."""

SQUARE_SIDE = 0.8
"""Side of the square within its unit box (a full-box square would look much bigger than
the other shapes of the same nominal size)."""


def _fit_unit_box(points: np.ndarray) -> np.ndarray:
    """Centre a polygon on its bounding box and scale its larger side to 1."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    return (points - (lo + hi) / 2) / float((hi - lo).max())


@cache
def unit_polygons(shape: str) -> tuple[np.ndarray, ...]:
    """The polygons (each [n, 2], x right, y down) whose union is ``shape`` in the unit box.

    The circle is returned as a 64-gon for geometry (area, tests); the renderer draws it
    with PIL's ellipse instead.
    """
    if shape == "circle":
        t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        return (0.5 * np.stack([np.cos(t), np.sin(t)], axis=1),)
    if shape == "square":
        h = SQUARE_SIDE / 2
        return (np.array([[-h, -h], [h, -h], [h, h], [-h, h]]),)
    if shape == "diamond":
        return (np.array([[0, -0.5], [0.5, 0], [0, 0.5], [-0.5, 0]], dtype=float),)
    if shape == "triangle":
        tri = np.array([[0, -1], [math.sqrt(3) / 2 * 1.0, 0.5], [-math.sqrt(3) / 2, 0.5]])
        return (_fit_unit_box(tri),)
    if shape == "star":
        k = np.arange(10)
        r = np.where(k % 2 == 0, 1.0, STAR_INNER_RATIO)
        ang = -math.pi / 2 + k * math.pi / 5  # first tip straight up
        return (_fit_unit_box(np.stack([r * np.cos(ang), r * np.sin(ang)], axis=1)),)
    if shape == "cross":
        w = CROSS_ARM_WIDTH / 2
        return (
            np.array([[-0.5, -w], [0.5, -w], [0.5, w], [-0.5, w]]),
            np.array([[-w, -0.5], [w, -0.5], [w, 0.5], [-w, 0.5]]),
        )
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


@cache
def unit_area(shape: str) -> float:
    """Area of ``shape`` in its unit box (fraction of the box it covers)."""
    if shape == "circle":
        return math.pi / 4
    if shape == "cross":
        return 2 * CROSS_ARM_WIDTH - CROSS_ARM_WIDTH**2
    (poly,) = unit_polygons(shape)
    x, y = poly[:, 0], poly[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def coverage(
    shape: str,
    center: tuple[float, float],
    extent: float,
    canvas: int,
    supersample: int = 8,
) -> np.ndarray:
    """Antialiased coverage of one shape on a ``canvas`` x ``canvas`` pixel grid.

    Args:
        shape: one of ``SHAPES``.
        center: (x, y) of the bounding-box centre in pixel units (pixel k spans [k, k+1)).
        extent: side of the bounding box, in pixels.
        canvas: output side in pixels.
        supersample: PIL draws at ``canvas * supersample`` and the result is box-filtered.

    Returns:
        float32 [canvas, canvas] with values in [0, 1].
    """
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    s = int(supersample)
    cx, cy = center
    # Draw only the object's window (plus a pixel of margin), then paste it in place.
    x0 = max(0, math.floor(cx - extent / 2) - 1)
    y0 = max(0, math.floor(cy - extent / 2) - 1)
    x1 = min(canvas, math.ceil(cx + extent / 2) + 1)
    y1 = min(canvas, math.ceil(cy + extent / 2) + 1)
    out = np.zeros((canvas, canvas), dtype=np.float32)
    if x1 <= x0 or y1 <= y0:
        return out
    big = Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)
    draw = ImageDraw.Draw(big)

    # PIL puts pixel centres on integer coordinates; our pixel k spans [k, k+1), so a
    # continuous coordinate x lands at (x - x0) * s - 0.5 on the supersampled window.
    def to_big(px: float, py: float) -> tuple[float, float]:
        return ((px - x0) * s - 0.5, (py - y0) * s - 0.5)

    if shape == "circle":
        r = extent / 2
        bx0, by0 = to_big(cx - r, cy - r)
        bx1, by1 = to_big(cx + r, cy + r)
        # PIL's ellipse box is inclusive of its last pixel; shrink it by half a pixel each
        # side so the drawn disc has the requested diameter.
        draw.ellipse([bx0 + 0.5, by0 + 0.5, bx1 - 0.5, by1 - 0.5], fill=255)
    else:
        for poly in unit_polygons(shape):
            pts = [to_big(cx + extent * px, cy + extent * py) for px, py in poly]
            draw.polygon(pts, fill=255)
    # Box filter in C (Image.reduce): each output pixel is the mean of its s x s block.
    small = np.asarray(big.reduce(s), dtype=np.float32)
    out[y0:y1, x0:x1] = small / 255.0
    return out
