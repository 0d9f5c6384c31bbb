"""Held-out synthetic referring scenes: an independent renderer, for evaluation only.

The scenes use the generator's words (colour and shape names, ``vocabulary()``) and nothing else
of it: their own palette (:data:`PALETTE`), shape geometry, placement, backgrounds and phrasings,
so that a score on them is not a score on the generator's way of drawing. Training, checkpoint
selection and tuning never read them (``TrainConfig`` refuses ``data.synthetic_renderer=heldout``).

:class:`HeldoutScenes` draws one of :data:`VARIANTS` (a way of drawing scenes) and gives the
families of :data:`GROUPS` equal turns (sample i is of family ``groups[i % len(groups)]``). Sample
i depends only on ``(variant, seed, i)``. Objects never overlap (rejection sampling of bounding
discs with a gap), and a mask is the hard raster of its objects' shapes at the image resolution.
"""

from __future__ import annotations

import colorsys
import io
import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw

from sharedris.data.synthetic import COLOURS, SHAPES
from sharedris.data.synthetic.families import vocabulary

TAG = 60611  # first entropy word of every sample's generator: no generator split code equals it
VARIANTS: tuple[str, ...] = ("few", "lone", "crowded", "pastel", "jpeg", "wide", "tall")
GROUPS: tuple[str, ...] = ("colour_shape", "size", "position", "relation", "multi_target", "no_target",
                           "unknown_word")
KNOWN_WORDS: frozenset[str] = vocabulary()

# Fill colour of each colour name (each object adds a jitter of up to +-8 per channel).
_RGB = {"red": (206, 30, 38), "green": (34, 150, 60), "blue": (30, 88, 212), "yellow": (244, 212, 16),
        "purple": (126, 48, 170), "orange": (248, 128, 14)}
PALETTE: dict[str, tuple[int, int, int]] = {name: _RGB[name] for name in COLOURS}  # KeyError: a new colour
# Words for things nothing in these scenes is (unknown_word); never words of KNOWN_WORDS. Colours
# near a drawn one or a background (grey, white, beige, violet, ...) and shapes near a drawn one
# (rectangle, oval, ball, moon, ...) are left out on purpose.
FOREIGN = {
    "colour": ("pink", "brown", "cyan", "turquoise"),
    "noun": ("cat", "dog", "car", "tree", "banana", "house", "boat", "cloud", "arrow", "heart", "cup", "key",
             "bird", "chair", "book", "spoon", "lamp", "horse"),
    "adjective": ("striped", "spotted", "wooden", "furry", "dotted", "checkered", "fluffy"),
}
_SLOT_KIND = {"c": "colour", "ac": "colour", "s": "noun", "as": "noun", "S": "noun", "a": "adjective"}
_NUMBER = {2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class Variant:
    """How a variant draws: object count, canvas, object size band, background, finish."""

    counts: tuple[int, int]  # objects per scene, inclusive
    aspect: tuple[int, int]  # width : height
    long_side: tuple[int, int]  # pixels, log-uniform
    band: tuple[float, float]  # equivalent radius of ordinary objects, fraction of the short side
    background: str  # light_dark | plain | pastel | gradient
    antialias: bool = False  # 4x supersampled shapes with a darker 1-3 px outline
    jpeg: int | None = None  # saved and reloaded as JPEG of this quality
    lone: bool = False  # every object has its own colour (multi_target colour groups excepted)


SPECS: dict[str, Variant] = {
    "few": Variant((1, 2), (1, 1), (128, 512), (0.06, 0.14), "light_dark"),
    "lone": Variant((2, 6), (1, 1), (128, 512), (0.06, 0.14), "plain", lone=True),
    "crowded": Variant((8, 10), (1, 1), (128, 512), (0.05, 0.085), "plain"),
    "pastel": Variant((2, 7), (1, 1), (128, 512), (0.06, 0.14), "pastel", antialias=True),
    "jpeg": Variant((2, 7), (1, 1), (128, 512), (0.06, 0.14), "gradient", jpeg=30),
    # 64 to 1600 px on the long side, but never a short side under 64 px (objects stay >= 3.8 px).
    "wide": Variant((2, 7), (3, 2), (96, 1600), (0.06, 0.14), "plain"),
    "tall": Variant((2, 7), (2, 5), (160, 1600), (0.06, 0.14), "plain"),
}
# Fewest objects a family's scene needs: size/position compare 2 of a shape, relation adds an anchor.
_MIN_OBJECTS = {"colour_shape": 1, "size": 2, "position": 2, "relation": 3, "multi_target": 2}
POSITION_MARGIN = 0.12  # the position target beats the runner-up by this fraction of the image side
RELATION_MARGIN = (0.12, 1.25)  # nearest/farthest beats the runner-up by this fraction of the short side and ratio
SIZE_BANDS = ((1.0, 1.08), (2.0, 2.2))  # small / big equivalent radius, in units of the band's lower end


def _vertices(shape: str, rotation: float) -> np.ndarray:
    """(k, 2) outline of ``shape`` with equivalent radius 1 (area pi), centred, y down, turned by degrees."""
    def around(radii: list[float], start: float) -> np.ndarray:
        a = np.radians(start + rotation + np.arange(len(radii)) * 360.0 / len(radii))
        return np.stack([np.cos(a), np.sin(a)], axis=1) * np.asarray(radii)[:, None]

    if shape == "square":  # side sqrt(pi): half-diagonal sqrt(pi / 2)
        return around([math.sqrt(math.pi / 2)] * 4, 45.0)
    if shape == "triangle":  # equilateral, point up: area 3 sqrt(3) / 4 R^2
        return around([math.sqrt(4 * math.pi / (3 * math.sqrt(3)))] * 3, -90.0)
    if shape == "hexagon":  # area 3 sqrt(3) / 2 R^2
        return around([math.sqrt(2 * math.pi / (3 * math.sqrt(3)))] * 6, 0.0)
    if shape == "star":  # five points, inner radius 0.42 R: area 5 * 0.42 R^2 sin 36
        outer = math.sqrt(math.pi / (5 * 0.42 * math.sin(math.radians(36))))
        return around([outer, 0.42 * outer] * 5, -90.0)
    if shape == "diamond":  # rhombus 1.45 times as tall as wide: area 2.9 w^2
        w = math.sqrt(math.pi / 2.9)
        pts = np.array([[0.0, -1.45 * w], [w, 0.0], [0.0, 1.45 * w], [-w, 0.0]])
        t = math.radians(rotation)
        return pts @ np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])
    raise ValueError(f"no geometry for shape {shape!r}")


_TURN = {"circle": 0.0, "square": 12.0, "diamond": 8.0, "triangle": 180.0, "star": 180.0, "hexagon": 180.0}


@dataclass
class _Obj:
    shape: str
    colour: str
    radius: float  # equivalent radius, pixels
    jitter: np.ndarray
    rotation: float
    x: float = 0.0
    y: float = 0.0

    @property
    def rgb(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in np.clip(np.add(PALETTE[self.colour], self.jitter), 0, 255))

    @property
    def bound(self) -> float:
        """Radius of the disc around the centre that holds the whole shape."""
        return self.radius if self.shape == "circle" else float(
            np.hypot(*_vertices(self.shape, self.rotation).T).max() * self.radius)

    def draw(self, draw: ImageDraw.ImageDraw, fill: Any, scale: int = 1, outline: Any = None, width: int = 0) -> None:
        """Draw at ``scale`` times the canvas size, a pixel's centre at the centre of its sub-pixel block."""
        circle = self.shape == "circle"
        unit = np.array([[-1.0, -1.0], [1.0, 1.0]]) if circle else _vertices(self.shape, self.rotation)
        xy = [(x, y) for x, y in ((unit * self.radius + (self.x, self.y)) * scale + (scale - 1) / 2).tolist()]
        (draw.ellipse if circle else draw.polygon)(xy, fill=fill, outline=outline, width=width)


@dataclass
class _Plan:
    """A scene's objects before placement, its expression, and how its referents are found once placed."""

    objs: list[_Obj]
    template: str
    slots: dict[str, str]
    resolve: Callable[[list[_Obj]], list[int] | None]  # referents' indices, or None: ambiguous, lay out again
    hide: Callable[[], None] = lambda: None  # makes the referent absent (no_target)


@dataclass
class _Ctx:
    rng: np.random.Generator
    spec: Variant
    canvas: tuple[int, int]  # width, height
    used: set[str] = field(default_factory=set)  # colours given out so far

    @property
    def short(self) -> int:
        return min(self.canvas)

    def pick(self, items: Any, exclude: Any = ()) -> Any:
        pool = [x for x in items if x not in exclude]
        return pool[int(self.rng.integers(len(pool)))]

    def colour(self, exclude: Any = ()) -> str:
        """A colour not in ``exclude``; in a lone variant also one no object has yet (if any is left)."""
        fresh = [c for c in COLOURS if c not in exclude and c not in self.used]
        c = self.pick(fresh if self.spec.lone and fresh else [c for c in COLOURS if c not in exclude])
        self.used.add(c)
        return c

    def obj(self, shape: str, colour: str, size: str = "any") -> _Obj:
        lo, hi = self.spec.band
        if size != "any":
            lo, hi = (lo * f for f in SIZE_BANDS[size == "big"])
        self.used.add(colour)
        return _Obj(shape, colour, float(self.rng.uniform(lo, hi)) * self.short,
                    self.rng.integers(-8, 9, 3), float(self.rng.uniform(-1, 1)) * _TURN[shape])

    def other(self, c: str, s: str) -> _Obj:
        """An object that is not a (c, s): in a lone variant neither of colour c nor of shape s."""
        if self.spec.lone:
            return self.obj(self.pick(SHAPES, {s}), self.colour({c}))
        shape = self.pick(SHAPES)
        return self.obj(shape, self.colour({c}) if shape == s else self.pick(COLOURS))

    def group(self, k: int, shape: str, sizes: tuple[str, ...] = ()) -> tuple[list[_Obj], str | None]:
        """k objects of ``shape`` (sizes as ``obj`` takes them): one colour half the time (never in a
        lone variant), else any colours."""
        shared = self.colour() if not self.spec.lone and self.rng.random() < 0.5 else None
        sizes = sizes or ("any",) * k
        return [self.obj(shape, shared or self.colour(), size) for size in sizes], shared

    def reshape(self, objs: list[_Obj], exclude: set[str]) -> None:
        new = self.pick(SHAPES, exclude)
        for o in objs:
            o.shape, o.rotation = new, float(self.rng.uniform(-1, 1)) * _TURN[new]


def _colour_shape(ctx: _Ctx, n: int) -> _Plan:
    c, s = ctx.colour(), ctx.pick(SHAPES)
    objs = [ctx.obj(s, c)]
    if not ctx.spec.lone and n >= 2:
        objs.append(ctx.obj(ctx.pick(SHAPES, {s}), c))  # shares the colour
    if not ctx.spec.lone and n >= 3:
        objs.append(ctx.obj(s, ctx.pick(COLOURS, {c})))  # shares the shape
    objs += [ctx.other(c, s) for _ in range(n - len(objs))]

    def hide() -> None:
        objs[0].colour = ctx.colour({c})

    template = ctx.pick(("the {c} {s}", "{c} {s}", "the {s} that is {c}", "the {c} {s} in the picture"))
    return _Plan(objs, template, {"c": c, "s": s}, lambda _: [0], hide)


def _size(ctx: _Ctx, n: int) -> _Plan:
    k, s, big = min(n, int(ctx.rng.integers(2, 4))), ctx.pick(SHAPES), bool(ctx.rng.random() < 0.5)
    # the target (first) big and the others small, or the reverse
    objs, shared = ctx.group(k, s, tuple("big" if (j == 0) == big else "small" for j in range(k)))
    objs += [ctx.obj(ctx.pick(SHAPES, {s}), ctx.colour()) for _ in range(n - k)]
    slots = {"s": s, "S": s + "s", "a": ctx.pick(("big", "large") if big else ("small",)),
             "cmp": ctx.pick(("bigger", "larger") if big else ("smaller",)),
             "sup": ctx.pick(("biggest", "largest") if big else ("smallest",))}
    template = ctx.pick(("the {a} {s}", "the {cmp} {s}", "the {cmp} of the two {S}") if k == 2
                        else ("the {a} {s}", "the {sup} {s}"))
    if shared and ctx.rng.random() < 0.4:
        template, slots["c"] = template.replace("{s}", "{c} {s}").replace("{S}", "{c} {S}"), shared
    return _Plan(objs, template, slots, lambda _: [0], lambda: ctx.reshape(objs[:k], {s}))


_POSITION_TEMPLATES = {
    "left": ("the leftmost {s}", "the {s} on the left", "the {s} on the far left", "the {s} furthest to the left"),
    "right": ("the rightmost {s}", "the {s} on the right", "the {s} on the far right", "the {s} furthest to the right"),
    "top": ("the topmost {s}", "the {s} at the top", "the highest {s}"),
    "bottom": ("the lowest {s}", "the {s} at the bottom", "the bottom {s}"),
}


def _position(ctx: _Ctx, n: int) -> _Plan:
    k, s, side = min(n, int(ctx.rng.integers(2, 4))), ctx.pick(SHAPES), ctx.pick(tuple(_POSITION_TEMPLATES))
    objs = ctx.group(k, s)[0]
    objs += [ctx.obj(ctx.pick(SHAPES, {s}), ctx.colour()) for _ in range(n - k)]

    def resolve(placed: list[_Obj]) -> list[int] | None:
        along = np.array([o.x if side in ("left", "right") else o.y for o in placed[:k]])
        score = along if side in ("right", "bottom") else -along
        first, second = np.sort(score)[::-1][:2]
        extent = ctx.canvas[0] if side in ("left", "right") else ctx.canvas[1]
        return [int(np.argmax(score))] if first - second >= POSITION_MARGIN * extent else None

    return _Plan(objs, ctx.pick(_POSITION_TEMPLATES[side]), {"s": s}, resolve, lambda: ctx.reshape(objs[:k], {s}))


def _relation(ctx: _Ctx, n: int) -> _Plan:
    k, s, near = min(n - 1, int(ctx.rng.integers(2, 4))), ctx.pick(SHAPES), bool(ctx.rng.random() < 0.5)
    objs = ctx.group(k, s)[0]
    anchor_shape = ctx.pick(SHAPES, {s})
    anchor = ctx.obj(anchor_shape, ctx.colour())
    objs.append(anchor)
    for _ in range(n - k - 1):  # no other candidate, no second anchor
        shape = ctx.pick(SHAPES, {s})
        objs.append(ctx.obj(shape, ctx.colour({anchor.colour} if shape == anchor_shape else ())))

    def resolve(placed: list[_Obj]) -> list[int] | None:
        a = placed[k]
        dist = np.array([math.hypot(o.x - a.x, o.y - a.y) for o in placed[:k]])
        order = np.argsort(dist if near else -dist)
        best, second = dist[order[0]], dist[order[1]]
        low, high = min(best, second), max(best, second)
        clear = high - low >= RELATION_MARGIN[0] * ctx.short and high >= RELATION_MARGIN[1] * low
        return [int(order[0])] if clear else None

    def hide() -> None:
        if ctx.rng.random() < 0.5:
            anchor.colour = ctx.colour({anchor.colour})  # the anchor was the only one of its pair
        else:
            ctx.reshape(objs[:k], {s, anchor_shape})

    template = ctx.pick(("the {s} closest to the {ac} {as}", "the {s} nearest to the {ac} {as}",
                         "the {s} next to the {ac} {as}") if near else
                        ("the {s} farthest from the {ac} {as}", "the {s} furthest from the {ac} {as}"))
    return _Plan(objs, template, {"s": s, "ac": anchor.colour, "as": anchor_shape}, resolve, hide)


# multi_target, per kind of group: the forms for any count, the form for two, the form for three or four
_MULTI_TEMPLATES = {
    "colour": (("all the {c} shapes", "all the {c} objects", "every {c} shape", "all the {c} things"),
               "both {c} shapes", "all {n} {c} objects"),
    "shape": (("all the {S}", "every {s}", "each {s}", "the {S}"), "both {S}", "all {n} {S}"),
    "pair": (("all the {c} {S}", "every {c} {s}", "all {c} {S}"), "both {c} {S}", "the {n} {c} {S}"),
}


def _multi_target(ctx: _Ctx, n: int) -> _Plan:
    k, kind = int(ctx.rng.integers(2, min(4, n) + 1)), ctx.pick(("colour", "shape", "pair"))
    c, s = ctx.colour() if kind != "shape" else "", ctx.pick(SHAPES)
    if kind == "colour":
        objs = [ctx.obj(ctx.pick(SHAPES), c) for _ in range(k)]
        objs += [ctx.obj(ctx.pick(SHAPES), ctx.colour({c})) for _ in range(n - k)]
    elif kind == "shape":
        objs = [ctx.obj(s, ctx.colour()) for _ in range(k)]
        objs += [ctx.obj(ctx.pick(SHAPES, {s}), ctx.colour()) for _ in range(n - k)]
    else:
        objs = [ctx.obj(s, c) for _ in range(k)]
        if not ctx.spec.lone and n - k >= 1:
            objs.append(ctx.obj(ctx.pick(SHAPES, {s}), c))  # shares the colour
        if not ctx.spec.lone and n - k >= 2:
            objs.append(ctx.obj(s, ctx.pick(COLOURS, {c})))  # shares the shape
        objs += [ctx.other(c, s) for _ in range(n - len(objs))]
    forms, two, more = _MULTI_TEMPLATES[kind]
    template = ctx.pick((*forms, two if k == 2 else more))
    return _Plan(objs, template, {"c": c, "s": s, "S": s + "s", "n": _NUMBER[k]}, lambda _: list(range(k)))


_BUILDERS: dict[str, Callable[[_Ctx, int], _Plan]] = {
    "colour_shape": _colour_shape, "size": _size, "position": _position, "relation": _relation,
    "multi_target": _multi_target,
}


def _made_up(rng: np.random.Generator) -> str:
    """A pronounceable made-up word: 2-3 consonant-vowel syllables, sometimes a final consonant."""
    word = "".join(rng.choice(list("bdfgklmnprstvz")) + rng.choice(list("aeiou"))
                   for _ in range(int(rng.integers(2, 4))))
    word += rng.choice(["", "n", "k", "m"])
    return word if word not in KNOWN_WORDS else _made_up(rng)


def _place(rng: np.random.Generator, objs: list[_Obj], width: int, height: int, short: int) -> bool:
    """Non-overlapping bounding discs (a gap between them, a border to the edge); False if none found."""
    gap, border = max(2.0, 0.025 * short), max(1.0, 0.01 * short)
    order = sorted(range(len(objs)), key=lambda i: -objs[i].bound)
    for _ in range(20):
        centres: list[tuple[float, float, float]] = []
        for i in order:
            r = objs[i].bound + border
            if 2 * r > min(width, height):
                return False
            xy = rng.uniform((r, r), (width - r, height - r), size=(200, 2))
            ok = np.ones(len(xy), dtype=bool)
            for x, y, rr in centres:
                ok &= np.hypot(xy[:, 0] - x, xy[:, 1] - y) >= objs[i].bound + rr + gap
            if not ok.any():
                break
            objs[i].x, objs[i].y = (float(v) for v in xy[int(np.argmax(ok))])
            centres.append((objs[i].x, objs[i].y, objs[i].bound))
        else:
            return True
    return False


def _background(rng: np.random.Generator, kind: str, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8: light or dark, plain grey-ish, pastel tint, or a linear gradient of two greys."""
    def grey(lo: int, hi: int, tint: int) -> np.ndarray:
        return np.clip(rng.integers(lo, hi + 1) + rng.integers(-tint, tint + 1, 3), 0, 255).astype(np.float64)

    if kind == "light_dark":
        colour = grey(205, 245, 6) if rng.random() < 0.5 else grey(18, 60, 6)
    elif kind == "pastel":
        colour = 255 * np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.08, 0.2), rng.uniform(0.9, 0.98)))
    elif kind == "plain":
        colour = grey(40, 225, 8)
    else:
        a, b, angle = grey(50, 225, 10), grey(50, 225, 10), rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:height, 0:width]
        t = xs * math.cos(angle) + ys * math.sin(angle)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
        return np.round(a + (b - a) * t[..., None]).astype(np.uint8)
    return np.broadcast_to(np.round(colour).astype(np.uint8), (height, width, 3))


class HeldoutScenes:
    """Held-out referring scenes of one variant: ``len()`` samples, ``ds[i]`` a dict (torch-free).

    Keys: ``image`` (PIL RGB at its own size), ``mask`` (bool HxW, the referred objects' union; all
    False when nothing is referred to), ``text``, ``ann_ids`` (referred objects' indices in
    ``objects``), ``group`` and ``family`` (the family), ``variant``, ``objects`` (per object: shape,
    colour, rgb, bbox [x, y, w, h] of its mask, centre (x, y), radius (equivalent, pixels),
    rotation, area in mask pixels), ``phrased_as`` (the family whose grammar the text follows),
    ``slots`` (the in-vocabulary words the text was built from), ``unknown`` (the out-of-world
    word, unknown_word only), ``labels`` (uint8 HxW: k + 1 on object k's hard raster, 0 elsewhere)
    and ``background`` (the background colour; None for a gradient).

    ``groups``: the families in report order; ``few`` has no ``relation`` (it needs 3 objects).
    """

    def __init__(self, variant: str, length: int = 300, seed: int = 0) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown held-out variant {variant!r}; variants: {', '.join(VARIANTS)}")
        if length < 0 or seed < 0:
            raise ValueError(f"length and seed must be >= 0, got length={length}, seed={seed}")
        self.variant, self.length, self.seed, self.spec = variant, length, seed, SPECS[variant]
        self.groups: tuple[str, ...] = tuple(
            g for g in GROUPS if _MIN_OBJECTS.get(g, 1) <= self.spec.counts[1])
        self.vocabulary = KNOWN_WORDS

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = operator.index(index)
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        index %= self.length
        rng = np.random.default_rng([TAG, VARIANTS.index(self.variant), self.seed, index])
        family, spec = self.groups[index % len(self.groups)], self.spec
        bases = [f for f in _BUILDERS if f in self.groups]
        base = family if family in _BUILDERS else str(rng.choice(
            [f for f in bases if f != "multi_target"] if family == "no_target" else bases))
        long = math.exp(rng.uniform(*np.log(spec.long_side)))
        aw, ah = spec.aspect
        width, height = (round(long), round(long * ah / aw)) if aw >= ah else (round(long * aw / ah), round(long))
        short = min(width, height)
        for _ in range(300):
            ctx = _Ctx(rng, spec, (width, height))
            lo, hi = spec.counts
            plan = _BUILDERS[base](ctx, int(rng.integers(max(lo, _MIN_OBJECTS[base]), hi + 1)))
            if family == "no_target":
                plan.hide()
            if not _place(rng, plan.objs, width, height, short):
                continue
            targets = plan.resolve(plan.objs) if family != "no_target" else []
            if targets is not None:
                break
        else:
            raise RuntimeError(f"no {family} layout found for {self.variant} sample {index}")
        slots, unknown = dict(plan.slots), None
        if family in ("no_target", "unknown_word"):
            targets = []
        if family == "unknown_word":
            names = [m for m in re.findall(r"\{(\w+)\}", plan.template) if m in _SLOT_KIND]
            slot = names[int(rng.integers(len(names)))]
            word = rng.choice(FOREIGN[_SLOT_KIND[slot]]) if rng.random() < 0.7 else _made_up(rng)
            unknown = str(word)
            slots[slot] = unknown + "s" if slot == "S" else unknown
        text = plan.template.format(**slots)
        order = rng.permutation(len(plan.objs))  # the referents anywhere in the list
        objs = [plan.objs[j] for j in order]
        ann_ids = sorted(int(np.flatnonzero(order == t)[0]) for t in targets)
        image, labels, background = self._paint(rng, objs, width, height)
        referred = np.zeros(len(objs) + 1, dtype=bool)
        referred[[t + 1 for t in ann_ids]] = True
        return {"image": image, "mask": referred[labels], "text": text, "ann_ids": ann_ids, "group": family,
                "family": family, "variant": self.variant, "objects": self._describe(objs, labels),
                "phrased_as": str(base), "slots": dict(plan.slots), "unknown": unknown, "labels": labels,
                "background": background}

    def _paint(self, rng: np.random.Generator, objs: list[_Obj], width: int, height: int
               ) -> tuple[Image.Image, np.ndarray, tuple[int, int, int] | None]:
        """The image and the label map (k + 1 on object k's hard raster, 0 elsewhere)."""
        spec = self.spec
        back = _background(rng, spec.background, width, height)
        plain = tuple(int(v) for v in back[0, 0]) if spec.background != "gradient" else None
        labels = Image.new("L", (width, height), 0)
        for k, o in enumerate(objs):
            o.draw(ImageDraw.Draw(labels), k + 1)
        if spec.antialias:
            line, s = int(rng.integers(1, 4)), 4
            image = Image.new("RGB", (width * s, height * s), plain)
            for o in objs:
                dark = tuple(int(v * 0.55) for v in o.rgb)
                o.draw(ImageDraw.Draw(image), o.rgb, scale=s, outline=dark, width=line * s)
            image = image.resize((width, height), Image.Resampling.BOX)
        else:
            image = Image.new("RGB", (width, height), plain) if plain else Image.fromarray(back, "RGB")
            for o in objs:
                o.draw(ImageDraw.Draw(image), o.rgb)
        if spec.jpeg is not None:
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=spec.jpeg)
            image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        return image, np.asarray(labels), plain

    @staticmethod
    def _describe(objs: list[_Obj], labels: np.ndarray) -> list[dict[str, Any]]:
        """Each object's attributes, and the bbox and area of its mask (looked for near its centre)."""
        out = []
        for k, o in enumerate(objs):
            x0, y0 = max(int(o.x - o.bound) - 2, 0), max(int(o.y - o.bound) - 2, 0)
            ys, xs = np.nonzero(labels[y0:int(o.y + o.bound) + 3, x0:int(o.x + o.bound) + 3] == k + 1)
            out.append({"shape": o.shape, "colour": o.colour, "rgb": o.rgb, "centre": (o.x, o.y), "radius": o.radius,
                        "bbox": [x0 + int(xs.min()), y0 + int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1],
                        "rotation": o.rotation, "area": int(len(xs))})
        return out
