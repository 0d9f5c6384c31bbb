"""The four expression families: which objects a scene gets and how its expression is resolved.

Each family is built so that no single cue solves it (distractors share the target's colour or shape):

- ``colour_shape``: "the red circle"; other objects share its colour or its shape.
- ``size``: "the small square"; 2-3 same-colour squares whose sizes differ by >= ``SIZE_RATIO``.
- ``position``: "the leftmost star"; 2-3 same-colour stars, the target extreme by >= the margin.
- ``relation``: "the circle closest to the purple triangle"; 2-3 same-colour circles, a unique
  anchor, the target nearest (or farthest) by >= the margin.

A builder ``BUILDERS[family](rng, size)`` draws the objects to place and returns them with a
resolver; once they are placed, the resolver picks the target (and anchor) and the phrasings, or
returns None when the layout leaves the expression ambiguous.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from sharedris.data.synthetic.geometry import COLOURS, SHAPES, Placed, Spec

FAMILIES: tuple[str, ...] = ("colour_shape", "size", "position", "relation")

SIZE_RATIO = 1.6  # the size family's smallest ratio between the equivalent radii of two classes
MARGIN = 0.08  # fraction of the image side separating the target from the runner-up (position, relation)
CENTRE_RADIUS = 0.2  # fraction of the side: a "middle" target must lie this close to the image centre

# Equivalent radius (radius of the circle of the same area), as fractions of the image side.
_MEDIUM = (0.058, 0.10)
_SMALL = (0.058, 0.068)
_BIG = (_SMALL[1] * SIZE_RATIO * 1.03, 0.13)  # 3% above SIZE_RATIO: headroom for rasterisation

# A resolver looks at a placed layout and returns (target, anchor, phrasings), or None to retry.
Resolver = Callable[[list[Placed], np.random.Generator], tuple[int, int | None, list[str]] | None]


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
) -> list[Spec]:
    """Unconstrained extra objects whose shape and (colour, shape) cannot confuse the expression."""
    out: list[Spec] = []
    while len(out) < count:
        spec = Spec(_pick(rng, SHAPES, bad_shapes), _pick(rng, list(COLOURS)), _scale(rng, size, _MEDIUM))
        if (spec.colour, spec.shape) not in bad_pairs:
            out.append(spec)
    return out


def _colour_shape(rng: np.random.Generator, size: int) -> tuple[list[Spec], Resolver]:
    """The only red circle, among at least one other red thing and one other circle."""
    shape, colour = _pick(rng, SHAPES), _pick(rng, list(COLOURS))
    specs = [
        Spec(shape, colour, _scale(rng, size, _MEDIUM)),
        Spec(_pick(rng, SHAPES, [shape]), colour, _scale(rng, size, _MEDIUM)),
        Spec(shape, _pick(rng, list(COLOURS), [colour]), _scale(rng, size, _MEDIUM)),
    ]
    specs += _fillers(rng, size, int(rng.integers(0, 4)), [], [(colour, shape)])

    def resolve(objs: list[Placed], rng: np.random.Generator) -> tuple[int, None, list[str]]:
        target = next(i for i, o in enumerate(objs) if (o.spec.shape, o.spec.colour) == (shape, colour))
        templates = ["the {c} {s}", "{c} {s}", "the {s} that is {c}", "the {c} {s} in the picture"]
        return target, None, _phrasings(rng, templates, c=colour, s=shape)

    return specs, resolve


def _size(rng: np.random.Generator, size: int) -> tuple[list[Spec], Resolver]:
    """The one small (or big) square among 1-2 same-colour squares of the other size class."""
    shape, colour = _pick(rng, SHAPES), _pick(rng, list(COLOURS))
    big = bool(rng.integers(2))
    own, other = (_BIG, _SMALL) if big else (_SMALL, _BIG)
    k = int(rng.integers(2, 4))
    specs = [Spec(shape, colour, _scale(rng, size, own))]
    specs += [Spec(shape, colour, _scale(rng, size, other)) for _ in range(k - 1)]
    # A same-colour, same-size-class object of another shape: "the small red one" stays ambiguous.
    specs.append(Spec(_pick(rng, SHAPES, [shape]), colour, _scale(rng, size, own)))
    specs += _fillers(rng, size, int(rng.integers(0, 6 - len(specs) + 1)), [shape], [])

    def resolve(objs: list[Placed], rng: np.random.Generator) -> tuple[int, None, list[str]]:
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


def _position(rng: np.random.Generator, size: int) -> tuple[list[Spec], Resolver]:
    """2-3 same-colour stars; the target is the one extreme in a direction, by at least the margin."""
    shape, colour = _pick(rng, SHAPES), _pick(rng, list(COLOURS))
    k = int(rng.integers(2, 4))
    specs = [Spec(shape, colour, _scale(rng, size, _MEDIUM)) for _ in range(k)]
    specs += _fillers(rng, size, int(rng.integers(1, 6 - k + 1)), [shape], [])

    def resolve(objs: list[Placed], rng: np.random.Generator) -> tuple[int, None, list[str]] | None:
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


def _relation(rng: np.random.Generator, size: int) -> tuple[list[Spec], Resolver]:
    """2-3 same-colour circles and a unique anchor; the target is the nearest (or farthest) by a margin."""
    shape, colour = _pick(rng, SHAPES), _pick(rng, list(COLOURS))
    a_shape, a_colour = _pick(rng, SHAPES, [shape]), _pick(rng, list(COLOURS))
    k = int(rng.integers(2, 4))
    specs = [Spec(shape, colour, _scale(rng, size, _MEDIUM)) for _ in range(k)]
    specs.append(Spec(a_shape, a_colour, _scale(rng, size, _MEDIUM)))
    if rng.integers(2):  # a decoy with the anchor's shape, so the anchor needs its colour too
        specs.append(Spec(a_shape, _pick(rng, list(COLOURS), [a_colour]), _scale(rng, size, _MEDIUM)))
    specs += _fillers(rng, size, int(rng.integers(0, 6 - len(specs) + 1)), [shape], [(a_colour, a_shape)])

    def resolve(objs: list[Placed], rng: np.random.Generator) -> tuple[int, int, list[str]] | None:
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


BUILDERS: dict[str, Callable[[np.random.Generator, int], tuple[list[Spec], Resolver]]] = {
    "colour_shape": _colour_shape,
    "size": _size,
    "position": _position,
    "relation": _relation,
}
