"""Read a shapes-world image back into objects, and score prompt adherence.

Classical image analysis, no learning:

1. Background: a plane (per channel, a + b x + c y) fitted robustly to the image border,
   which absorbs the faint gradient texture; its mean names the background colour.
2. Colour segmentation: every pixel is explained as a blend of the background and one
   palette colour, ``p = bg + alpha * (colour - bg)``; the colour whose blend line passes
   closest to the pixel wins. Antialiased edges are exactly such blends, so an edge between
   red and white is read as half red, never as pink, which a nearest-colour rule would say.
3. Connected components (8-connected) of the pixels that are at least half one colour;
   every other pixel nearby is given to its nearest component, which collects the soft
   coverage (alpha) of the object's antialiased rim.
4. Shape: the alpha map, centred on its centroid and scaled by sqrt(area) (so translation
   and size drop out), lightly blurred and sampled on a grid, is compared with the same
   descriptor of each ideal shape; the nearest wins. The descriptor captures what the
   classical features do (fill ratio, corners, arms, symmetry) in one vector, and its
   blur keeps it stable on blurry or noisy images (a VQ autoencoder's output).
5. Size from area / the shape's fill ratio; cell from the bounding-box centre.

``matches(spec, detected)`` then says whether an image shows exactly what a parsed prompt
asks for.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage

from cm3rt.demo.shapes.captions import PromptSpec, parse_caption
from cm3rt.demo.shapes.geometry import coverage, unit_area, unit_polygons
from cm3rt.demo.shapes.vocab import BACKGROUNDS, COLOURS, GRID, SHAPES, SIZES

_PALETTE = np.asarray(list(COLOURS.values()), dtype=np.float32)  # [K, 3]
_COLOUR_NAMES = tuple(COLOURS)
_BG_PALETTE = np.asarray(list(BACKGROUNDS.values()), dtype=np.float32)
_BG_NAMES = tuple(BACKGROUNDS)

# Descriptor grid: offsets from the centroid in units of sqrt(area). The farthest point of
# any shape (a star's tip) lies ~0.87 units out.
_GRID_HALF = 1.1
_GRID_N = 23
_DESC_BLUR = 0.08  # Gaussian sigma of the descriptor blur, in units of sqrt(area)


@dataclass(frozen=True)
class AnalyzerConfig:
    """Thresholds of ``analyze`` (defaults suit renders and mildly degraded images).

    Attributes:
        core_alpha: a pixel is part of an object's core when at least this much of it is
            the object's colour.
        max_residual: a pixel may count as colour c only if its distance from the
            background->c blend line is at most this fraction of |c - background|.
        min_core_pixels: cores with fewer pixels are specks (their pixels join the nearest
            larger core).
        split_fraction: a connected core is split by colour only when a second colour holds
            at least this share of its pixels; otherwise it takes its majority colour.
        min_area: objects whose soft area is below this fraction of the smallest ideal
            object's area are dropped as noise.
        halo: radius (pixels at 64 px; scaled with the image) around a core within which
            soft edge coverage is collected.
        alpha_floor: coverage below this is treated as background noise.
        max_shape_distance: objects whose descriptor is farther than this (RMS) from every
            ideal shape are reported with shape "unknown".
    """

    core_alpha: float = 0.5
    max_residual: float = 0.5
    min_core_pixels: int = 4
    split_fraction: float = 0.3
    min_area: float = 0.3
    halo: float = 2.5
    alpha_floor: float = 0.1
    max_shape_distance: float = 0.15

    def __post_init__(self) -> None:
        for name in ("core_alpha", "split_fraction", "alpha_floor"):
            v = getattr(self, name)
            if not 0.0 < float(v) <= 1.0:
                raise ValueError(f"AnalyzerConfig.{name} must be in (0, 1], got {v!r}")
        for name in ("max_residual", "min_area", "halo", "max_shape_distance"):
            v = getattr(self, name)
            if not float(v) >= 0.0:
                raise ValueError(f"AnalyzerConfig.{name} must be >= 0, got {v!r}")
        if not isinstance(self.min_core_pixels, int) or self.min_core_pixels < 1:
            raise ValueError(
                f"AnalyzerConfig.min_core_pixels must be an int >= 1, got {self.min_core_pixels!r}"
            )


@dataclass(frozen=True)
class DetectedObject:
    """One object found in an image.

    Attributes:
        shape: one of ``SHAPES``, or "unknown" when no shape fits.
        colour: one of ``COLOURS``.
        size: "small" or "large".
        cell: (row, col) on the 3 x 3 grid.
        center: (x, y) of the estimated bounding-box centre, in pixels.
        area: soft area in pixels.
        extent: estimated bounding-box side in pixels.
        shape_distance: RMS descriptor distance to the chosen shape (0 = ideal).
        shape_margin: distance to the runner-up shape minus ``shape_distance``.
    """

    shape: str
    colour: str
    size: str
    cell: tuple[int, int]
    center: tuple[float, float]
    area: float
    extent: float
    shape_distance: float
    shape_margin: float


@dataclass(frozen=True)
class Analysis:
    """Everything ``analyze_scene`` reads from an image."""

    objects: tuple[DetectedObject, ...]
    background: str


# ---------------------------------------------------------------------------- input


def _as_rgb_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"))
    elif isinstance(image, np.ndarray):
        arr = image
    else:
        raise TypeError(
            f"image must be a PIL.Image or a uint8 numpy array [H, W, 3], got "
            f"{type(image).__name__}"
        )
    if arr.dtype != np.uint8:
        raise TypeError(f"image array must have dtype uint8, got {arr.dtype}")
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image array must have shape [H, W, 3], got {list(arr.shape)}")
    if min(arr.shape[:2]) < 16:
        raise ValueError(
            f"image must be at least 16 x 16 pixels, got {arr.shape[1]} x {arr.shape[0]}"
        )
    return arr.astype(np.float32)


# ------------------------------------------------------------------------ background


@lru_cache(maxsize=8)
def _plane_design(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frame pixel indices, their design rows [n, 3], all pixels' design rows [h*w, 3])."""
    frame = np.zeros((h, w), dtype=bool)
    frame[:2, :] = frame[-2:, :] = frame[:, :2] = frame[:, -2:] = True
    gy, gx = np.mgrid[0:h, 0:w]
    design = np.stack([np.ones(h * w), gx.ravel() / w - 0.5, gy.ravel() / h - 0.5], axis=1)
    idx = np.flatnonzero(frame.ravel())
    return idx, design[idx], design


def _fit_background(img: np.ndarray) -> np.ndarray:
    """Per-channel plane a + b x + c y fitted to the border (2 px frame), refitted once
    without the pixels far from the first fit (an object touching the border)."""
    h, w, _ = img.shape
    idx, d_frame, d_all = _plane_design(h, w)
    values = img.reshape(-1, 3)[idx].astype(np.float64)

    def fit(rows: np.ndarray) -> np.ndarray:
        d = d_frame[rows]
        return np.linalg.solve(d.T @ d + 1e-9 * np.eye(3), d.T @ values[rows])  # [3, 3]

    coef = fit(np.ones(len(idx), dtype=bool))
    resid = np.linalg.norm(values - d_frame @ coef, axis=1)
    keep = resid < max(12.0, 2.5 * float(np.median(resid)))
    if keep.sum() >= 16:
        coef = fit(keep)
    return (d_all @ coef).reshape(h, w, 3).astype(np.float32)


def _background_name(bg: np.ndarray) -> str:
    mean = bg.reshape(-1, 3).mean(axis=0)
    return _BG_NAMES[int(np.argmin(np.linalg.norm(_BG_PALETTE - mean, axis=1)))]


# ----------------------------------------------------------------- shape descriptor


def _descriptor(alpha: np.ndarray, cx: float, cy: float, scale: float) -> np.ndarray:
    """Alpha around (cx, cy), blurred and sampled on a grid in units of ``scale``."""
    blurred = ndimage.gaussian_filter(alpha, sigma=_DESC_BLUR * scale, mode="constant")
    u = np.linspace(-_GRID_HALF, _GRID_HALF, _GRID_N)
    gy, gx = np.meshgrid(cy - 0.5 + u * scale, cx - 0.5 + u * scale, indexing="ij")
    # map_coordinates samples at pixel centres (index i is the centre of pixel i).
    return ndimage.map_coordinates(blurred, [gy, gx], order=1, mode="constant", cval=0.0)


def _shape_centroid_offset(shape: str) -> tuple[float, float]:
    """Centroid of the unit shape relative to its bounding-box centre (unit extent)."""
    if shape in ("circle", "square", "diamond", "cross"):
        return (0.0, 0.0)
    (poly,) = unit_polygons(shape)
    x, y = poly[:, 0], poly[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    a = cross.sum() / 2
    return (float(((x + xn) * cross).sum() / (6 * a)), float(((y + yn) * cross).sum() / (6 * a)))


@lru_cache(maxsize=1)
def _prototypes() -> np.ndarray:
    """[len(SHAPES), N*N] ideal descriptors, averaged over both sizes and a few sub-pixel
    positions of a clean 64 px render (the descriptor is size-normalised, so these serve
    any image size)."""
    protos = []
    canvas = 64
    for shape in SHAPES:
        acc = []
        for frac in SIZES.values():
            extent = frac * canvas
            for dx, dy in ((0.0, 0.0), (0.25, 0.5), (0.5, 0.25), (0.75, 0.75)):
                a = coverage(shape, (32.0 + dx, 32.0 + dy), extent, canvas)
                area = float(a.sum())
                gy, gx = np.mgrid[0:canvas, 0:canvas]
                cx = float((a * (gx + 0.5)).sum() / area)
                cy = float((a * (gy + 0.5)).sum() / area)
                acc.append(_descriptor(a, cx, cy, math.sqrt(area)).ravel())
        protos.append(np.mean(acc, axis=0))
    return np.stack(protos)


# ---------------------------------------------------------------------------- analyze


def _label_cores(core: np.ndarray, best: np.ndarray,
                 cfg: AnalyzerConfig) -> tuple[np.ndarray, list[int]]:
    """8-connected components of the core pixels, one palette colour each.

    A component takes its majority colour, so a few off-colour pixels inside an object
    (JPEG chroma, a decoder's colour noise) do not break it up; it is split by colour only
    when a second colour holds a substantial share of it (two touching objects). Specks
    are dropped (their pixels later join the nearest component).

    Returns:
        labels: int32 [H, W], 0 = no core, j = component j.
        colours: palette index of component j at position j - 1.
    """
    eight = np.ones((3, 3), dtype=bool)
    lab, _n = ndimage.label(core, structure=eight)
    labels = np.zeros(core.shape, dtype=np.int32)
    colours: list[int] = []
    for j, sl in enumerate(ndimage.find_objects(lab), start=1):
        mask = lab[sl] == j
        size = int(mask.sum())
        if size < cfg.min_core_pixels:
            continue
        votes = np.bincount(best[sl][mask], minlength=len(_PALETTE))
        strong = np.flatnonzero(votes >= max(cfg.min_core_pixels, cfg.split_fraction * size))
        if len(strong) <= 1:
            colours.append(int(votes.argmax()))
            labels[sl][mask] = len(colours)
            continue
        for k in strong:
            sub, ns = ndimage.label(mask & (best[sl] == k), structure=eight)
            counts = np.bincount(sub.ravel(), minlength=ns + 1)
            for q in range(1, ns + 1):
                if counts[q] >= cfg.min_core_pixels:
                    colours.append(int(k))
                    labels[sl][sub == q] = len(colours)
    return labels, colours


def analyze_scene(image, config: AnalyzerConfig | None = None) -> Analysis:
    """Detect the objects and the background of a shapes-world image.

    Args:
        image: PIL image or uint8 array [H, W, 3] (any size >= 16 px; 64 px is native).
        config: thresholds (``AnalyzerConfig()`` by default).
    """
    cfg = AnalyzerConfig() if config is None else config
    if not isinstance(cfg, AnalyzerConfig):
        raise TypeError(f"config must be an AnalyzerConfig, got {type(cfg).__name__}")
    img = _as_rgb_array(image)
    h, w, _ = img.shape
    side = math.sqrt(h * w)

    bg = _fit_background(img).reshape(-1, 3)  # [P, 3]
    diff = img.reshape(-1, 3) - bg  # [P, 3]
    # Blend line of colour k through the background: bg + alpha * d_k, d_k = c_k - bg.
    # Dot products via [P, 3] @ [3, K] so that no [P, K, 3] array is built.
    dot = diff @ _PALETTE.T - (diff * bg).sum(1, keepdims=True)  # <diff, d_k>  [P, K]
    norm2 = np.maximum(
        (_PALETTE**2).sum(1)[None] - 2 * bg @ _PALETTE.T + (bg**2).sum(1, keepdims=True), 1.0
    )  # |d_k|^2  [P, K]
    alpha = np.clip(dot / norm2, 0.0, 1.0)
    resid2 = (diff**2).sum(1, keepdims=True) - 2 * alpha * dot + alpha**2 * norm2
    best = resid2.argmin(1)  # [P]
    rows = np.arange(len(best))
    best_alpha = alpha[rows, best].reshape(h, w)
    best_rel = np.sqrt(np.maximum(resid2[rows, best], 0.0) / norm2[rows, best]).reshape(h, w)
    best = best.reshape(h, w)
    alpha = alpha.reshape(h, w, -1)
    bg = bg.reshape(h, w, 3)
    core = (best_alpha >= cfg.core_alpha) & (best_rel <= cfg.max_residual)

    labels, comp_colour = _label_cores(core, best, cfg)
    objects: list[DetectedObject] = []
    if comp_colour:
        # Every pixel belongs to its nearest core; the halo bounds how far that reaches.
        dist, (iy, ix) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
        owner = labels[iy, ix]
        owner[dist > cfg.halo * side / 64] = 0
        protos = _prototypes()
        gy, gx = np.mgrid[0:h, 0:w]
        smallest = min(unit_area(s) for s in SHAPES) * (min(SIZES.values()) * side) ** 2
        for j, k in enumerate(comp_colour, start=1):
            a = np.where(owner == j, alpha[:, :, k], 0.0)
            a[a < cfg.alpha_floor] = 0.0
            area = float(a.sum())
            if area < cfg.min_area * smallest:
                continue
            objects.append(_describe_object(a, area, k, gx, gy, h, w, side, protos, cfg))
    objects.sort(key=lambda o: o.cell)
    return Analysis(tuple(objects), _background_name(bg))


def _describe_object(a, area, k, gx, gy, h, w, side, protos, cfg) -> DetectedObject:
    cx = float((a * (gx + 0.5)).sum() / area)
    cy = float((a * (gy + 0.5)).sum() / area)
    desc = _descriptor(a, cx, cy, math.sqrt(area)).ravel()
    dists = np.sqrt(((protos - desc) ** 2).mean(axis=1))
    order = np.argsort(dists)
    best_d = float(dists[order[0]])
    shape = SHAPES[int(order[0])] if best_d <= cfg.max_shape_distance else "unknown"
    ref = SHAPES[int(order[0])]
    extent = math.sqrt(area / unit_area(ref))
    ox, oy = _shape_centroid_offset(ref)
    bx, by = cx - ox * extent, cy - oy * extent
    threshold = (SIZES["small"] + SIZES["large"]) / 2 * side
    cell = (min(GRID - 1, max(0, int(by * GRID // h))), min(GRID - 1, max(0, int(bx * GRID // w))))
    return DetectedObject(
        shape=shape,
        colour=_COLOUR_NAMES[k],
        size="large" if extent > threshold else "small",
        cell=cell,
        center=(bx, by),
        area=area,
        extent=extent,
        shape_distance=best_d,
        shape_margin=float(dists[order[1]] - best_d),
    )


def analyze(image, config: AnalyzerConfig | None = None) -> list[DetectedObject]:
    """The objects of a shapes-world image, in reading order of their cells.

    See ``analyze_scene`` for the arguments and the module docstring for the method.
    """
    return list(analyze_scene(image, config).objects)


# ---------------------------------------------------------------------------- scoring


def _relation_holds(kind: str, a, b) -> bool:
    (ra, ca), (rb, cb) = a.cell, b.cell
    if kind == "above":
        return ca == cb and ra < rb
    if kind == "left of":
        return ra == rb and ca < cb
    raise ValueError(f"relation kind must be 'above' or 'left of', got {kind!r}")


def matches(spec: PromptSpec, detected, *, background: str | None = None) -> bool:
    """True when ``detected`` shows exactly what ``spec`` asks for.

    The objects must pair one-to-one with the spec's (no extra, no missing object); each
    attribute the spec gives (shape, colour, and size / cell where named) must agree; the
    relation, if any, must hold between the paired objects; the background must agree when
    the spec names one and a background is known.

    Args:
        spec: a ``PromptSpec`` (from ``parse_caption``).
        detected: an ``Analysis``, or a sequence of objects with ``shape``, ``colour``,
            ``size`` and ``cell`` (``DetectedObject`` or a scene's ``SceneObject``).
        background: the image's background name, when ``detected`` is not an Analysis.
    """
    if not isinstance(spec, PromptSpec):
        raise TypeError(f"spec must be a PromptSpec, got {type(spec).__name__}")
    if isinstance(detected, Analysis):
        background = detected.background if background is None else background
        detected = detected.objects
    objs = list(detected)
    if len(objs) != len(spec.objects):
        return False
    if spec.background is not None and background is not None and spec.background != background:
        return False
    for perm in itertools.permutations(objs):
        ok = all(
            d.shape == s.shape
            and d.colour == s.colour
            and (s.size is None or d.size == s.size)
            and (s.cell is None or tuple(d.cell) == tuple(s.cell))
            for s, d in zip(spec.objects, perm)
        )
        rel = spec.relation
        if ok and rel is not None:
            ok = _relation_holds(rel.kind, perm[rel.first], perm[rel.second])
        if ok:
            return True
    return False


def caption_matches(caption: str, image, config: AnalyzerConfig | None = None) -> bool:
    """Whether ``image`` shows what ``caption`` asks for (parse, analyze, match)."""
    return matches(parse_caption(caption), analyze_scene(image, config))
