"""What can be drawn and where: the shapes and colours, their unit polygons, rasterising, placement.

Every shape is a polygon centred at 0 and scaled to the area of the unit circle, so an object's
``scale`` (its equivalent radius: the radius of the circle of the same area) means the same size
for every shape. :func:`place` puts objects at random without overlap and returns the label map
whose pixels are exactly those drawn for each object.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "hexagon")
# Shapes the varied world draws but never names: a model must not take them for one of ``SHAPES``.
UNNAMED_SHAPES: tuple[str, ...] = ("cross", "arrow", "heart")
COLOUR_JITTER = 15  # per-channel jitter of an object's colour

_MAX_ROTATION = {"circle": 0, "square": 15, "triangle": 180, "star": 36, "diamond": 15, "hexagon": 30,
                 "cross": 45, "arrow": 180, "heart": 20}
_PLACE_TRIES = 60


def _ring(n: int, radii: Sequence[float], phase_deg: float) -> np.ndarray:
    """Vertices of a star-shaped polygon: ``n`` points at cyclically repeated ``radii``."""
    angles = np.deg2rad(phase_deg + 360.0 * np.arange(n) / n)
    r = np.resize(np.asarray(radii, dtype=np.float64), n)
    return np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)


def _polygon_area(poly: np.ndarray) -> float:
    """Shoelace area of a simple polygon given as (V, 2) vertices."""
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _heart(n: int) -> np.ndarray:
    """The classic heart curve (x = 16 sin^3 t, y = 13 cos t - 5 cos 2t - 2 cos 3t - cos 4t), point down."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y - y.mean()], axis=1) / 16


def _unit_shapes() -> dict[str, np.ndarray]:
    """Shapes centred at 0, scaled to the area of the unit circle so "size" means area for all shapes.

    Image y points down, so a phase of -90 degrees puts the first vertex at the top.
    """
    raw = {
        "circle": _ring(32, [1.0], 0),  # 32 vertices: < 0.2 px from a true circle at our sizes
        "square": _ring(4, [1.0], 45),
        "triangle": _ring(3, [1.0], -90),
        "star": _ring(10, [1.0, 0.5], -90),
        "diamond": np.array([[0.0, -1.0], [0.62, 0.0], [0.0, 1.0], [-0.62, 0.0]]),  # narrow: not a square
        "hexagon": _ring(6, [1.0], 0),
        "cross": np.array([[-1, -3], [1, -3], [1, -1], [3, -1], [3, 1], [1, 1], [1, 3], [-1, 3], [-1, 1],
                           [-3, 1], [-3, -1], [-1, -1]], dtype=np.float64) / 3,
        "arrow": np.array([[1.0, 0.0], [0.1, -0.8], [0.1, -0.3], [-1.0, -0.3], [-1.0, 0.3], [0.1, 0.3],
                           [0.1, 0.8]]),
        "heart": _heart(40),
    }
    return {name: poly * math.sqrt(math.pi / _polygon_area(poly)) for name, poly in raw.items()}


_UNIT = _unit_shapes()


def _inner_radius(poly: np.ndarray) -> float:
    """Radius of the largest disc centred at 0 inside a polygon that is star-shaped around 0."""
    p, q = poly, np.roll(poly, -1, axis=0)
    t = np.clip(np.einsum("ij,ij->i", -p, q - p) / np.einsum("ij,ij->i", q - p, q - p), 0.0, 1.0)
    return float(np.linalg.norm(p + t[:, None] * (q - p), axis=1).min())


_REACH = {name: float(np.linalg.norm(poly, axis=1).max()) for name, poly in _UNIT.items()}
_INNER = {name: _inner_radius(poly) for name, poly in _UNIT.items()}


@dataclass
class Spec:
    """An object to place: what it is, before knowing where."""

    shape: str
    colour: str
    scale: float  # equivalent radius in pixels


@dataclass
class Placed:
    """A placed object: its polygon in image coordinates and the bbox and area of its rasterised mask."""

    spec: Spec
    centre: tuple[float, float]
    rotation: float
    rgb: tuple[int, int, int]
    polygon: np.ndarray  # (V, 2) vertices, rounded to 2 decimals
    bbox: tuple[int, int, int, int]  # pixel bbox of the mask: x, y, w, h
    area: int


def rasterise(poly: np.ndarray, size: int) -> tuple[np.ndarray, int, int]:
    """Rasterise a (V, 2) polygon into a bool crop clipped to the ``size`` x ``size`` image.

    Returns (crop, x0, y0): the crop is bool (h, w) with its top-left pixel at (x0, y0). The crop
    origin is integral, so the pixels equal those of drawing on the full image.
    """
    x0 = max(int(math.floor(poly[:, 0].min())), 0)
    y0 = max(int(math.floor(poly[:, 1].min())), 0)
    x1 = min(int(math.ceil(poly[:, 0].max())) + 1, size)
    y1 = min(int(math.ceil(poly[:, 1].max())) + 1, size)
    crop = Image.new("1", (x1 - x0, y1 - y0))
    ImageDraw.Draw(crop).polygon((poly - (x0, y0)).ravel().tolist(), fill=1)
    return np.asarray(crop), x0, y0


def place(
    specs: list[Spec], size: int, rng: np.random.Generator, stretch: tuple[float, float] = (1.0, 1.0)
) -> tuple[list[Placed], np.ndarray] | None:
    """Place objects at random without overlap; returns (objects, label map) or None if they don't fit.

    The label map is uint8 (``size``, ``size``): label ``k + 1`` marks object ``k``, 0 the
    background. A candidate's polygon grown by a gap must not touch any placed object, so objects
    stay visibly apart and no mask is ever occluded. Disc tests (the shapes' inscribed and
    circumscribed radii) settle most candidates without rasterising. ``stretch`` scales every
    shape by (x, y) after rotating it: a non-square picture squashed to a square stretches its
    objects so (the product is kept at 1, so areas and ``scale`` keep their meaning).
    """
    wide, narrow = max(stretch), min(stretch)
    gap = max(2.0, 0.02 * size)
    labels = np.zeros((size, size), dtype=np.uint8)
    placed: list[Placed] = []
    for spec in specs:
        rotation = float(rng.uniform(-1.0, 1.0) * _MAX_ROTATION[spec.shape])
        t = math.radians(rotation)
        unit = _UNIT[spec.shape] @ np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])
        unit = unit * stretch
        reach = _REACH[spec.shape] * (spec.scale + gap) * wide
        inner = _INNER[spec.shape] * (spec.scale + gap) * narrow
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3).tolist()
        r, g, b = (min(max(v + j, 0), 255) for v, j in zip(COLOURS[spec.colour], jitter))
        for _ in range(_PLACE_TRIES):
            x, y = rng.uniform(reach, size - reach, 2)
            unsure = False
            for o in placed:
                d = math.hypot(x - o.centre[0], y - o.centre[1])
                if d < inner + _INNER[o.spec.shape] * o.spec.scale * narrow:
                    break
                unsure |= d < reach + _REACH[o.spec.shape] * o.spec.scale * wide
            else:
                if unsure:
                    grown, gx, gy = rasterise((x, y) + unit * (spec.scale + gap), size)
                    if labels[gy : gy + grown.shape[0], gx : gx + grown.shape[1]][grown].any():
                        continue
                # Rounded vertices are what the refer writer stores; rasterise those for consistency.
                polygon = np.round((x, y) + unit * spec.scale, 2)
                mask, x0, y0 = rasterise(polygon, size)
                labels[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]][mask] = len(placed) + 1
                rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
                top, left = int(rows[0]), int(cols[0])
                bbox = (x0 + left, y0 + top, int(cols[-1]) - left + 1, int(rows[-1]) - top + 1)
                centre = (float(x), float(y))
                placed.append(Placed(spec, centre, rotation, (r, g, b), polygon, bbox, int(mask.sum())))
                break
        else:
            return None
    return placed, labels
