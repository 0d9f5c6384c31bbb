"""Deterministic procedural referring scenes: the default dataset, CPU benchmark and test fixture source.

Every sample is a textured image with 3-6 flat shapes, one referring expression that identifies
exactly one of them (the target) and the target's boolean mask. Expressions come in four families,
each built so that no single cue solves it (distractors share the target's colour or shape):

- ``colour_shape``: "the red circle"; other objects share its colour or its shape.
- ``size``: "the small square"; 2-3 same-colour squares whose sizes differ by >= ``SIZE_RATIO``.
- ``position``: "the leftmost star"; 2-3 same-colour stars, the target extreme by >= the margin.
- ``relation``: "the circle closest to the purple triangle"; 2-3 same-colour circles, a unique
  anchor, the target nearest (or farthest) by >= the margin.

A sample depends only on ``(split, seed, index)``: its generator is
``numpy.random.default_rng([SPLITS[split], seed, index])`` and split codes differ, so splits never
share scenes. Objects never overlap (rejection sampling with a gap), so each mask is exactly the
pixels drawn for its object. ``write_refer_format`` writes a dataset in the RefCOCO refer layout.
"""

from __future__ import annotations

import json
import math
import operator
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

FAMILIES: tuple[str, ...] = ("colour_shape", "size", "position", "relation")
SPLITS: dict[str, int] = {"train": 1, "val": 2, "test": 3, "testA": 4, "testB": 5}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "hexagon")

SIZE_RATIO = 1.6  # the size family's smallest ratio between the equivalent radii of two classes
MARGIN = 0.08  # fraction of the image side separating the target from the runner-up (position, relation)
CENTRE_RADIUS = 0.2  # fraction of the side: a "middle" target must lie this close to the image centre
COLOUR_JITTER = 15  # per-channel jitter of an object's colour
NOISE = 8  # per-pixel uniform noise amplitude, kept small so object colours stay recognisable

# Equivalent radius (radius of the circle of the same area), as fractions of the image side.
_MEDIUM = (0.058, 0.10)
_SMALL = (0.058, 0.068)
_BIG = (_SMALL[1] * SIZE_RATIO * 1.03, 0.13)  # 3% above SIZE_RATIO: headroom for rasterisation
_MAX_ROTATION = {"circle": 0, "square": 15, "triangle": 180, "star": 36, "diamond": 15, "hexagon": 30}
_PLACE_TRIES = 60
_SCENE_TRIES = 200
# Non-zero 4th entropy word of the auxiliary RNGs (text shuffle, refer writer): SeedSequence pads
# short entropy with zeros, so without it such a stream could equal a sample's.
_AUX_TAG = 7919


def _ring(n: int, radii: Sequence[float], phase_deg: float) -> np.ndarray:
    """Vertices of a star-shaped polygon: ``n`` points at cyclically repeated ``radii``."""
    angles = np.deg2rad(phase_deg + 360.0 * np.arange(n) / n)
    r = np.resize(np.asarray(radii, dtype=np.float64), n)
    return np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)


def _polygon_area(poly: np.ndarray) -> float:
    """Shoelace area of a simple polygon given as (V, 2) vertices."""
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


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
class _Spec:
    """An object to place: what it is, before knowing where."""

    shape: str
    colour: str
    scale: float  # equivalent radius in pixels


@dataclass
class _Placed:
    """A placed object: its polygon in image coordinates and the bbox and area of its rasterised mask."""

    spec: _Spec
    centre: tuple[float, float]
    rotation: float
    rgb: tuple[int, int, int]
    polygon: np.ndarray
    bbox: tuple[int, int, int, int]  # pixel bbox of the mask: x, y, w, h
    area: int


# A resolver looks at a placed layout and returns (target, anchor, phrasings), or None to retry.
_Resolver = Callable[[list[_Placed], np.random.Generator], tuple[int, int | None, list[str]] | None]


def _rasterise(poly: np.ndarray, size: int) -> tuple[np.ndarray, int, int]:
    """Rasterise a polygon into a bool crop clipped to the image; returns (crop, x0, y0).

    The crop origin is integral, so the pixels equal those of drawing on the full image.
    """
    x0 = max(int(math.floor(poly[:, 0].min())), 0)
    y0 = max(int(math.floor(poly[:, 1].min())), 0)
    x1 = min(int(math.ceil(poly[:, 0].max())) + 1, size)
    y1 = min(int(math.ceil(poly[:, 1].max())) + 1, size)
    crop = Image.new("1", (x1 - x0, y1 - y0))
    ImageDraw.Draw(crop).polygon((poly - (x0, y0)).ravel().tolist(), fill=1)
    return np.asarray(crop), x0, y0


def _place(
    specs: list[_Spec], size: int, rng: np.random.Generator
) -> tuple[list[_Placed], np.ndarray] | None:
    """Place objects at random without overlap; returns (objects, label map) or None if they don't fit.

    Label ``k + 1`` marks object ``k``. A candidate's polygon grown by a gap must not touch any
    placed object, so objects stay visibly apart and no mask is ever occluded. Disc tests (the
    shapes' inscribed and circumscribed radii) settle most candidates without rasterising.
    """
    gap = max(2.0, 0.02 * size)
    labels = np.zeros((size, size), dtype=np.uint8)
    placed: list[_Placed] = []
    for spec in specs:
        rotation = float(rng.uniform(-1.0, 1.0) * _MAX_ROTATION[spec.shape])
        t = math.radians(rotation)
        unit = _UNIT[spec.shape] @ np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])
        reach, inner = _REACH[spec.shape] * (spec.scale + gap), _INNER[spec.shape] * (spec.scale + gap)
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3).tolist()
        r, g, b = (min(max(v + j, 0), 255) for v, j in zip(COLOURS[spec.colour], jitter))
        for _ in range(_PLACE_TRIES):
            x, y = rng.uniform(reach, size - reach, 2)
            unsure = False
            for o in placed:
                d = math.hypot(x - o.centre[0], y - o.centre[1])
                if d < inner + _INNER[o.spec.shape] * o.spec.scale:
                    break
                unsure |= d < reach + _REACH[o.spec.shape] * o.spec.scale
            else:
                if unsure:
                    grown, gx, gy = _rasterise((x, y) + unit * (spec.scale + gap), size)
                    if labels[gy : gy + grown.shape[0], gx : gx + grown.shape[1]][grown].any():
                        continue
                # Rounded vertices are what the refer writer stores; rasterise those for consistency.
                polygon = np.round((x, y) + unit * spec.scale, 2)
                mask, x0, y0 = _rasterise(polygon, size)
                labels[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]][mask] = len(placed) + 1
                rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
                top, left = int(rows[0]), int(cols[0])
                bbox = (x0 + left, y0 + top, int(cols[-1]) - left + 1, int(rows[-1]) - top + 1)
                centre = (float(x), float(y))
                placed.append(_Placed(spec, centre, rotation, (r, g, b), polygon, bbox, int(mask.sum())))
                break
        else:
            return None
    return placed, labels


def _pick(rng: np.random.Generator, items: Sequence[str], exclude: Sequence[str] = ()) -> str:
    """Uniform choice among ``items`` not in ``exclude``."""
    pool = [x for x in items if x not in exclude]
    return pool[int(rng.integers(len(pool)))]


def _scale(rng: np.random.Generator, size: int, band: tuple[float, float]) -> float:
    """An equivalent radius in pixels, uniform in ``band`` (fractions of the image side)."""
    return float(rng.uniform(*band)) * size


def _phrasings(rng: np.random.Generator, templates: Sequence[str], **words: str) -> list[str]:
    """Fill templates, drop duplicates, and shuffle: the first is the sample's text."""
    texts = list(dict.fromkeys(t.format(**words) for t in templates))
    return [texts[i] for i in rng.permutation(len(texts))]


def _fillers(
    rng: np.random.Generator,
    size: int,
    count: int,
    bad_shapes: Sequence[str],
    bad_pairs: Sequence[tuple[str, str]],
) -> list[_Spec]:
    """Unconstrained extra objects whose shape and (colour, shape) cannot confuse the expression."""
    out: list[_Spec] = []
    while len(out) < count:
        spec = _Spec(_pick(rng, SHAPES, bad_shapes), _pick(rng, list(COLOURS)), _scale(rng, size, _MEDIUM))
        if (spec.colour, spec.shape) not in bad_pairs:
            out.append(spec)
    return out


def _colour_shape(rng: np.random.Generator, size: int) -> tuple[list[_Spec], _Resolver]:
    """The only red circle, among at least one other red thing and one other circle."""
    shape, colour = _pick(rng, SHAPES), _pick(rng, list(COLOURS))
    specs = [
        _Spec(shape, colour, _scale(rng, size, _MEDIUM)),
        _Spec(_pick(rng, SHAPES, [shape]), colour, _scale(rng, size, _MEDIUM)),
        _Spec(shape, _pick(rng, list(COLOURS), [colour]), _scale(rng, size, _MEDIUM)),
    ]
    specs += _fillers(rng, size, int(rng.integers(0, 4)), [], [(colour, shape)])

    def resolve(objs: list[_Placed], rng: np.random.Generator) -> tuple[int, None, list[str]]:
        target = next(i for i, o in enumerate(objs) if (o.spec.shape, o.spec.colour) == (shape, colour))
        templates = ["the {c} {s}", "{c} {s}", "the {s} that is {c}", "the {c} {s} in the picture"]
        return target, None, _phrasings(rng, templates, c=colour, s=shape)

    return specs, resolve


def _size(rng: np.random.Generator, size: int) -> tuple[list[_Spec], _Resolver]:
    """The one small (or big) square among 1-2 same-colour squares of the other size class."""
    shape, colour = _pick(rng, SHAPES), _pick(rng, list(COLOURS))
    big = bool(rng.integers(2))
    own, other = (_BIG, _SMALL) if big else (_SMALL, _BIG)
    k = int(rng.integers(2, 4))
    specs = [_Spec(shape, colour, _scale(rng, size, own))]
    specs += [_Spec(shape, colour, _scale(rng, size, other)) for _ in range(k - 1)]
    # A same-colour, same-size-class object of another shape: "the small red one" stays ambiguous.
    specs.append(_Spec(_pick(rng, SHAPES, [shape]), colour, _scale(rng, size, own)))
    specs += _fillers(rng, size, int(rng.integers(0, 6 - len(specs) + 1)), [shape], [])

    def resolve(objs: list[_Placed], rng: np.random.Generator) -> tuple[int, None, list[str]]:
        cands = [i for i, o in enumerate(objs) if o.spec.shape == shape]
        target = (max if big else min)(cands, key=lambda i: objs[i].spec.scale)
        adj = _pick(rng, ["big", "large"]) if big else "small"
        sup = _pick(rng, ["biggest", "largest"]) if big else "smallest"
        cmp = _pick(rng, ["bigger", "larger"]) if big else "smaller"
        templates = ["the {a} {s}", "the {a} {c} {s}", "the {sup} {s}"]
        if k == 2:
            templates += ["the {cmp} {s}", "the {cmp} {c} {s}", "the {cmp} of the two {s}s"]
        else:
            templates += ["the {sup} {c} {s}"]
        return target, None, _phrasings(rng, templates, a=adj, sup=sup, cmp=cmp, c=colour, s=shape)

    return specs, resolve


_POSITION_TEMPLATES = {
    "left": ["the {s} on the left", "the leftmost {s}", "the {c} {s} on the far left",
             "the {s} furthest to the left"],
    "right": ["the {s} on the right", "the rightmost {s}", "the {c} {s} on the far right",
              "the {s} furthest to the right"],
    "top": ["the {s} at the top", "the topmost {s}", "the highest {s}", "the {c} {s} at the top"],
    "bottom": ["the {s} at the bottom", "the bottom {s}", "the lowest {s}", "the {c} {s} at the bottom"],
    "middle": ["the {s} in the middle", "the {s} in the centre", "the central {s}",
               "the {c} {s} in the middle"],
}


def _position(rng: np.random.Generator, size: int) -> tuple[list[_Spec], _Resolver]:
    """2-3 same-colour stars; the target is the one extreme in a direction, by at least the margin."""
    shape, colour = _pick(rng, SHAPES), _pick(rng, list(COLOURS))
    k = int(rng.integers(2, 4))
    specs = [_Spec(shape, colour, _scale(rng, size, _MEDIUM)) for _ in range(k)]
    specs += _fillers(rng, size, int(rng.integers(1, 6 - k + 1)), [shape], [])

    def resolve(objs: list[_Placed], rng: np.random.Generator) -> tuple[int, None, list[str]] | None:
        cands = [i for i, o in enumerate(objs) if o.spec.shape == shape]
        xy = np.array([objs[i].centre for i in cands])
        keys = {  # smaller is more extreme
            "left": xy[:, 0],
            "right": -xy[:, 0],
            "top": xy[:, 1],
            "bottom": -xy[:, 1],
            "middle": np.linalg.norm(xy - size / 2, axis=1),
        }
        ok = []
        for direction, key in keys.items():
            order = np.argsort(key)
            near_centre = direction != "middle" or key[order[0]] <= CENTRE_RADIUS * size
            if key[order[1]] - key[order[0]] >= MARGIN * size and near_centre:
                ok.append((direction, cands[int(order[0])]))
        if not ok:
            return None
        direction, target = ok[int(rng.integers(len(ok)))]
        return target, None, _phrasings(rng, _POSITION_TEMPLATES[direction], c=colour, s=shape)

    return specs, resolve


def _relation(rng: np.random.Generator, size: int) -> tuple[list[_Spec], _Resolver]:
    """2-3 same-colour circles and a unique anchor; the target is the nearest (or farthest) by a margin."""
    shape, colour = _pick(rng, SHAPES), _pick(rng, list(COLOURS))
    a_shape, a_colour = _pick(rng, SHAPES, [shape]), _pick(rng, list(COLOURS))
    k = int(rng.integers(2, 4))
    specs = [_Spec(shape, colour, _scale(rng, size, _MEDIUM)) for _ in range(k)]
    specs.append(_Spec(a_shape, a_colour, _scale(rng, size, _MEDIUM)))
    if rng.integers(2):  # a decoy with the anchor's shape, so the anchor needs its colour too
        specs.append(_Spec(a_shape, _pick(rng, list(COLOURS), [a_colour]), _scale(rng, size, _MEDIUM)))
    specs += _fillers(rng, size, int(rng.integers(0, 6 - len(specs) + 1)), [shape], [(a_colour, a_shape)])

    def resolve(objs: list[_Placed], rng: np.random.Generator) -> tuple[int, int, list[str]] | None:
        anchor = next(i for i, o in enumerate(objs) if (o.spec.shape, o.spec.colour) == (a_shape, a_colour))
        cands = [i for i, o in enumerate(objs) if o.spec.shape == shape]
        ax, ay = objs[anchor].centre
        dist = np.array([math.hypot(objs[i].centre[0] - ax, objs[i].centre[1] - ay) for i in cands])
        order = np.argsort(dist)
        ok = []
        if dist[order[1]] - dist[order[0]] >= MARGIN * size:
            ok.append(("near", cands[int(order[0])]))
        if dist[order[-1]] - dist[order[-2]] >= MARGIN * size:
            ok.append(("far", cands[int(order[-1])]))
        if not ok:
            return None
        mode, target = ok[int(rng.integers(len(ok)))]
        if mode == "near":
            templates = ["the {s} closest to the {ac} {as}", "the {c} {s} next to the {ac} {as}",
                         "the {s} nearest to the {ac} {as}"]
        else:
            templates = ["the {s} farthest from the {ac} {as}", "the {c} {s} furthest from the {ac} {as}",
                         "the {s} far from the {ac} {as}"]
        return target, anchor, _phrasings(rng, templates, c=colour, s=shape, ac=a_colour, **{"as": a_shape})

    return specs, resolve


_BUILDERS: dict[str, Callable[[np.random.Generator, int], tuple[list[_Spec], _Resolver]]] = {
    "colour_shape": _colour_shape,
    "size": _size,
    "position": _position,
    "relation": _relation,
}


def _render(labels: np.ndarray, objs: list[_Placed], rng: np.random.Generator) -> Image.Image:
    """Paint a grey textured background (gradient, stripes, noise) and the flat-coloured objects.

    The background stays low-saturation so that it can never be mistaken for an object colour.
    Work is per channel on small arrays: whole float RGB images are big enough for malloc to hand
    them back to the OS after each sample, and the page faults then cost more than the arithmetic.
    """
    size = labels.shape[0]
    u = np.arange(size, dtype=np.float32) / size - 0.5
    gx, gy, fx, fy = rng.uniform(-1.0, 1.0, 4).astype(np.float32) * np.float32([25, 25, 6, 6])
    # Stripes sin(a(x) + b(y)) = sin a cos b + cos a sin b: two outer products of 1-D vectors are
    # much cheaper than a sine per pixel. Up to ~8 periods across, a few grey levels deep.
    a = np.float32(2 * np.pi) * fx * u + np.float32(rng.uniform(0, 2 * np.pi))
    b = np.float32(2 * np.pi) * fy * u
    grey = np.outer(np.cos(b), np.sin(a))
    grey += np.outer(np.sin(b), np.cos(a))
    grey *= np.float32(rng.uniform(3, 12))
    grey += gx * u[None, :] + gy * u[:, None] + np.float32(rng.uniform(80, 170))
    grey = grey.astype(np.int16)
    tint = rng.integers(-8, 9, 3).tolist()  # Python ints: adding a NumPy scalar is slower
    table = np.array([(0, 0, 0)] + [o.rgb for o in objs], dtype=np.int16).T
    foreground = labels > 0
    ids = labels[foreground]
    # Uniform in [0, 2 * NOISE] from random bytes by multiply-shift (far cheaper than % or integers()).
    noise = np.frombuffer(rng.bytes(3 * size * size), dtype=np.uint8).astype(np.uint16)
    noise = ((noise * (2 * NOISE + 1)) >> 8).astype(np.int16).reshape(3, size, size)
    channels = []
    for c in range(3):
        channel = grey + tint[c]
        channel[foreground] = table[c][ids]
        channel += noise[c]
        channel -= NOISE
        channels.append(Image.fromarray(np.clip(channel, 0, 255).astype(np.uint8)))
    return Image.merge("RGB", channels)


@dataclass
class _Scene:
    """A laid-out scene before rendering: enough to know the text without painting the image."""

    family: str
    objects: list[_Placed]
    labels: np.ndarray
    target: int
    anchor: int | None
    texts: list[str]


class SyntheticRefScenes:
    """A deterministic, torch-free dataset of synthetic referring scenes.

    ``ds[i]`` is a dict with ``image`` (PIL RGB, ``size`` x ``size``), ``mask`` (bool HxW, the
    target's pixels), ``text`` (the expression), ``texts`` (all valid phrasings, ``text`` first),
    ``family``, ``objects`` (per object: shape, category (= shape: the object's class, one of
    ``object_classes``, as the refer export writes it), colour, rgb, centre, scale = equivalent radius,
    rotation, bbox = pixel bbox [x, y, w, h] of its mask, polygon = flat [x1, y1, ...], area =
    mask pixels), ``target`` and ``anchor`` (object indices; anchor is None outside ``relation``),
    ``labels`` (uint8 HxW, ``k + 1`` on object ``k``, 0 on background), ``split`` and ``index``.

    Each scene's family is drawn uniformly from ``families``; list a family twice to draw it twice as
    often. With ``fresh_epochs``, ``set_epoch(e)`` moves the dataset to its e-th block of ``length``
    scenes (sample i is scene ``e * length + i``, and ``index`` is that scene number), so training
    never repeats a scene; otherwise ``set_epoch`` changes nothing.

    With ``shuffle_texts`` (and ``length >= 2``) the ``text``/``texts`` of sample i come from another
    sample of the same block (a fixed derangement), so text carries no information while images and
    masks stay: a control experiment. ``family`` stays the family of the scene, not of the text.
    """

    object_classes: tuple[str, ...] = SHAPES

    def __init__(
        self,
        split: str = "train",
        size: int = 160,
        length: int = 10000,
        seed: int = 0,
        families: Sequence[str] = FAMILIES,
        shuffle_texts: bool = False,
        fresh_epochs: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        unknown = [f for f in families if f not in FAMILIES]
        if unknown or not families:
            raise ValueError(f"families must be a non-empty list of names from {FAMILIES}, got {list(families)}")
        if size < 64:
            raise ValueError(f"size must be >= 64 to fit the objects, got {size}")
        if length < 0 or seed < 0:
            raise ValueError(f"length and seed must be >= 0, got length={length}, seed={seed}")
        self.split, self.size, self.length, self.seed = split, size, length, seed
        self.families = tuple(families)
        self.shuffle_texts = shuffle_texts
        self.fresh_epochs = fresh_epochs
        self._first = 0  # scene number of sample 0
        self._text_source: np.ndarray | None = None
        if shuffle_texts and length > 1:
            # Each sample takes the text of its successor on one random cycle: no sample keeps its own.
            cycle = np.random.default_rng([SPLITS[split], seed, length, _AUX_TAG]).permutation(length)
            self._text_source = np.empty(length, dtype=np.int64)
            self._text_source[cycle] = np.roll(cycle, -1)

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """With ``fresh_epochs``, serve epoch ``epoch``'s block of scenes; a no-op otherwise."""
        if self.fresh_epochs:
            self._first = epoch * self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = operator.index(index)
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        index %= self.length
        rng = np.random.default_rng([SPLITS[self.split], self.seed, self._first + index])
        scene = self._scene(rng)
        image = _render(scene.labels, scene.objects, rng)
        texts = scene.texts
        if self._text_source is not None:
            donor = self._first + int(self._text_source[index])
            texts = self._scene(np.random.default_rng([SPLITS[self.split], self.seed, donor])).texts
        objects = [
            {
                "shape": o.spec.shape,
                "category": o.spec.shape,
                "colour": o.spec.colour,
                "rgb": o.rgb,
                "centre": o.centre,
                "scale": o.spec.scale,
                "rotation": o.rotation,
                "bbox": list(o.bbox),
                "polygon": o.polygon.ravel().tolist(),
                "area": o.area,
            }
            for o in scene.objects
        ]
        return {
            "image": image,
            "mask": scene.labels == scene.target + 1,
            "text": texts[0],
            "texts": list(texts),
            "family": scene.family,
            "objects": objects,
            "target": scene.target,
            "anchor": scene.anchor,
            "labels": scene.labels,
            "split": self.split,
            "index": self._first + index,
        }

    def _scene(self, rng: np.random.Generator) -> _Scene:
        """Lay out one scene: pick a family, then retry layouts until its expression is unambiguous."""
        family = self.families[int(rng.integers(len(self.families)))]
        for _ in range(_SCENE_TRIES):
            specs, resolve = _BUILDERS[family](rng, self.size)
            specs = [specs[i] for i in rng.permutation(len(specs))]  # the target's index varies
            layout = _place(specs, self.size, rng)
            if layout is None:
                continue
            resolved = resolve(layout[0], rng)
            if resolved is not None:
                return _Scene(family, layout[0], layout[1], *resolved)
        raise RuntimeError(f"could not lay out a {family!r} scene at size {self.size}")


def write_refer_format(
    root: str | Path,
    splits: Mapping[str, int] | None = None,
    size: int = 160,
    seed: int = 0,
    families: Sequence[str] = FAMILIES,
) -> Path:
    """Write synthetic scenes in the RefCOCO refer layout (docs/reference.md) and return ``<root>/refcoco``.

    Writes ``refcoco/instances.json``, ``refcoco/refs(unc).p`` (pickle protocol 2, builtins only)
    and ``images/train2014/COCO_train2014_%012d.jpg``. ``splits`` maps split name to number of
    samples (default train 8, val/testA/testB 4). Each sample is one image whose objects are all
    annotations (polygon segmentation, bbox of the polygon, area = pixels of the rasterised
    polygon, category = shape) and whose target is one ref with 1 or 2 sentences (distinct
    phrasings; ``raw`` sometimes capitalised, ``sent`` lower case).
    """
    splits = dict(splits) if splits is not None else {"train": 8, "val": 4, "testA": 4, "testB": 4}
    root = Path(root)
    ref_dir, image_dir = root / "refcoco", root / "images" / "train2014"
    ref_dir.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    # Sentence count and capitalisation only; split code 0 belongs to no split, so the stream is new.
    rng = np.random.default_rng([0, seed, 0, _AUX_TAG])
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    refs: list[dict[str, Any]] = []
    sent_id = 0
    for split, count in splits.items():
        dataset = SyntheticRefScenes(split, size=size, length=count, seed=seed, families=families)
        for sample in (dataset[i] for i in range(count)):
            image_id = len(images) + 1
            file_name = f"COCO_train2014_{image_id:012d}.jpg"
            sample["image"].save(image_dir / file_name, quality=95)
            images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
            first_ann = len(annotations) + 1
            for k, obj in enumerate(sample["objects"]):
                xs, ys = obj["polygon"][0::2], obj["polygon"][1::2]
                annotations.append({
                    "id": first_ann + k,
                    "image_id": image_id,
                    "segmentation": [obj["polygon"]],
                    "bbox": [min(xs), min(ys), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)],
                    "area": float(obj["area"]),
                    "category_id": SHAPES.index(obj["shape"]) + 1,
                    "iscrowd": 0,
                })
            sentences = []
            for text in sample["texts"][: int(rng.integers(1, 3))]:
                sent_id += 1
                raw = text[0].upper() + text[1:] if rng.random() < 0.3 else text
                sent = text.lower()
                sentences.append({"sent_id": sent_id, "tokens": sent.split(), "raw": raw, "sent": sent})
            ref_id = len(refs) + 1
            refs.append({
                "ref_id": ref_id,
                "ann_id": first_ann + sample["target"],
                "image_id": image_id,
                "split": split,
                "category_id": SHAPES.index(sample["objects"][sample["target"]]["shape"]) + 1,
                "sent_ids": [s["sent_id"] for s in sentences],
                "file_name": f"COCO_train2014_{image_id:012d}_{ref_id}.jpg",
                "sentences": sentences,
            })
    instances = {
        "info": {"description": "sharedris synthetic referring scenes", "seed": seed},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)],
    }
    (ref_dir / "instances.json").write_text(json.dumps(instances))
    with open(ref_dir / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return ref_dir
