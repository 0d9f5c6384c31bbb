"""The expression families: which objects a scene gets and how its expression is resolved.

The four target families (``FAMILIES``) refer to exactly one object, and each is built so that no
single cue solves it (distractors share the target's colour or shape):

- ``colour_shape``: "the red circle"; other objects share its colour or its shape.
- ``size``: "the small square"; 2-3 same-colour squares whose sizes differ by >= ``SIZE_RATIO``.
- ``position``: "the leftmost star"; 2-3 same-colour stars, the target extreme by >= the margin.
- ``relation``: "the circle closest to the purple triangle"; 2-3 same-colour circles, a unique
  anchor, the target nearest (or farthest) by >= the margin.

``GENERAL_FAMILIES`` adds the two of generalised referring segmentation:

- ``no_target``: an expression of one of the four target families, drawn exactly as that family
  draws it, in a scene from which its referent is missing (:func:`hide_referent`): the text alone
  cannot tell that nothing matches.
- ``multi_target``: "all the red objects", "both triangles", "every red circle": 2-4 objects of one
  colour, shape or both, among distractors sharing the other attribute.

A builder ``BUILDERS[family](rng, size)`` draws the objects to place and returns them with a
resolver; once they are placed, the resolver picks the targets (and anchor) and the phrasings, or
returns None when the layout leaves the expression ambiguous. ``no_target`` has no builder: a
scene lays out a target family's expression and then hides its referent.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import numpy as np

from sharedris.data.synthetic.geometry import COLOURS, SHAPES, Placed, Spec
from sharedris.data.synthetic.phrases import (
    BIGGER_WORDS,
    BIGGEST_WORDS,
    BIG_WORDS,
    COLOUR_SHAPE_TEMPLATES,
    MULTI_ALL_N,
    MULTI_BOTH,
    MULTI_COUNTED,
    MULTI_TEMPLATES,
    NUMBERS,
    POSITION_TEMPLATES,
    RELATION_TEMPLATES,
    SIZE_PAIR_TEMPLATES,
    SIZE_TEMPLATES,
    SIZE_TRIO_TEMPLATES,
    SLOT_WORDS,
    phrasings,
    pick,
)

FAMILIES: tuple[str, ...] = ("colour_shape", "size", "position", "relation")
NO_TARGET, MULTI_TARGET = "no_target", "multi_target"
GENERAL_FAMILIES: tuple[str, ...] = FAMILIES + (NO_TARGET, MULTI_TARGET)

SIZE_RATIO = 1.6  # the size family's smallest ratio between the equivalent radii of two classes
MARGIN = 0.08  # fraction of the image side separating the target from the runner-up (position, relation)
CENTRE_RADIUS = 0.2  # fraction of the side: a "middle" target must lie this close to the image centre
# How many objects of the named shape a constructed relation scene holds (fewest, most); a training
# recipe of the varied world may draw more (at most MAX_RELATION_CANDIDATES, so the scene still fits).
RELATION_CANDIDATES = (2, 3)
MAX_RELATION_CANDIDATES = 4

# Equivalent radius (radius of the circle of the same area), as fractions of the image side.
_MEDIUM = (0.058, 0.10)
_SMALL = (0.058, 0.068)
_BIG = (_SMALL[1] * SIZE_RATIO * 1.03, 0.13)  # 3% above SIZE_RATIO: headroom for rasterisation

# A resolver looks at a placed layout and returns (targets, anchor, phrasings), or None to retry.
Resolver = Callable[[list[Placed], np.random.Generator], tuple[list[int], int | None, list[str]] | None]

# The templates each family's expressions come from (no_target: those of the target families).
_FAMILY_TEMPLATES: dict[str, list[tuple[str, ...]]] = {
    "colour_shape": [COLOUR_SHAPE_TEMPLATES],
    "size": [SIZE_TEMPLATES, SIZE_PAIR_TEMPLATES, SIZE_TRIO_TEMPLATES],
    "position": list(POSITION_TEMPLATES.values()),
    "relation": list(RELATION_TEMPLATES.values()),
    MULTI_TARGET: [*MULTI_TEMPLATES.values(), *MULTI_COUNTED.values(), *MULTI_BOTH.values(),
                   *MULTI_ALL_N.values()],
}
_FAMILY_TEMPLATES[NO_TARGET] = [group for family in FAMILIES for group in _FAMILY_TEMPLATES[family]]


def vocabulary(families: Sequence[str] = GENERAL_FAMILIES) -> frozenset[str]:
    """Every lower-case word an expression of ``families`` can contain, from the templates and word lists."""
    words: set[str] = set()
    for template in (t for family in families for group in _FAMILY_TEMPLATES[family] for t in group):
        for token in template.split():
            slot = re.fullmatch(r"([^{]*)\{(\w+)\}(.*)", token)  # at most one slot per word: "{s}s"
            words.update(slot[1] + w + slot[3] for w in SLOT_WORDS[slot[2]]) if slot else words.add(token)
    return frozenset(words)


def _scale(rng: np.random.Generator, size: int, band: tuple[float, float]) -> float:
    """An equivalent radius in pixels, uniform in ``band`` (fractions of the image side)."""
    return float(rng.uniform(*band)) * size


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
        spec = Spec(pick(rng, SHAPES, bad_shapes), pick(rng, list(COLOURS)), _scale(rng, size, _MEDIUM))
        if (spec.colour, spec.shape) not in bad_pairs:
            out.append(spec)
    return out


def _colour_shape(rng: np.random.Generator, size: int) -> tuple[list[Spec], Resolver]:
    """The only red circle, among at least one other red thing and one other circle."""
    shape, colour = pick(rng, SHAPES), pick(rng, list(COLOURS))
    specs = [
        Spec(shape, colour, _scale(rng, size, _MEDIUM)),
        Spec(pick(rng, SHAPES, [shape]), colour, _scale(rng, size, _MEDIUM)),
        Spec(shape, pick(rng, list(COLOURS), [colour]), _scale(rng, size, _MEDIUM)),
    ]
    specs += _fillers(rng, size, int(rng.integers(0, 4)), [], [(colour, shape)])

    def resolve(objs: list[Placed], rng: np.random.Generator) -> tuple[list[int], None, list[str]]:
        target = next(i for i, o in enumerate(objs) if (o.spec.shape, o.spec.colour) == (shape, colour))
        return [target], None, phrasings(rng, COLOUR_SHAPE_TEMPLATES, c=colour, s=shape)

    return specs, resolve


def _size(rng: np.random.Generator, size: int) -> tuple[list[Spec], Resolver]:
    """The one small (or big) square among 1-2 same-colour squares of the other size class."""
    shape, colour = pick(rng, SHAPES), pick(rng, list(COLOURS))
    big = bool(rng.integers(2))
    own, other = (_BIG, _SMALL) if big else (_SMALL, _BIG)
    k = int(rng.integers(2, 4))
    specs = [Spec(shape, colour, _scale(rng, size, own))]
    specs += [Spec(shape, colour, _scale(rng, size, other)) for _ in range(k - 1)]
    # A same-colour, same-size-class object of another shape: "the small red one" stays ambiguous.
    specs.append(Spec(pick(rng, SHAPES, [shape]), colour, _scale(rng, size, own)))
    specs += _fillers(rng, size, int(rng.integers(0, 6 - len(specs) + 1)), [shape], [])

    def resolve(objs: list[Placed], rng: np.random.Generator) -> tuple[list[int], None, list[str]]:
        cands = [i for i, o in enumerate(objs) if o.spec.shape == shape]
        target = (max if big else min)(cands, key=lambda i: objs[i].spec.scale)
        adj = pick(rng, BIG_WORDS) if big else "small"
        sup = pick(rng, BIGGEST_WORDS) if big else "smallest"
        cmp = pick(rng, BIGGER_WORDS) if big else "smaller"
        templates = SIZE_TEMPLATES + (SIZE_PAIR_TEMPLATES if k == 2 else SIZE_TRIO_TEMPLATES)
        return [target], None, phrasings(rng, templates, a=adj, sup=sup, cmp=cmp, c=colour, s=shape)

    return specs, resolve



def _position(rng: np.random.Generator, size: int) -> tuple[list[Spec], Resolver]:
    """2-3 same-colour stars; the target is the one extreme in a direction, by at least the margin."""
    shape, colour = pick(rng, SHAPES), pick(rng, list(COLOURS))
    k = int(rng.integers(2, 4))
    specs = [Spec(shape, colour, _scale(rng, size, _MEDIUM)) for _ in range(k)]
    specs += _fillers(rng, size, int(rng.integers(1, 6 - k + 1)), [shape], [])

    def resolve(objs: list[Placed], rng: np.random.Generator) -> tuple[list[int], None, list[str]] | None:
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
        return [target], None, phrasings(rng, POSITION_TEMPLATES[direction], c=colour, s=shape)

    return specs, resolve


def _relation(
    rng: np.random.Generator, size: int, candidates: tuple[int, int] = RELATION_CANDIDATES
) -> tuple[list[Spec], Resolver]:
    """2-3 (``candidates``) same-colour circles and a unique anchor; the target is the nearest (or
    farthest) by a margin."""
    shape, colour = pick(rng, SHAPES), pick(rng, list(COLOURS))
    a_shape, a_colour = pick(rng, SHAPES, [shape]), pick(rng, list(COLOURS))
    k = int(rng.integers(candidates[0], candidates[1] + 1))
    specs = [Spec(shape, colour, _scale(rng, size, _MEDIUM)) for _ in range(k)]
    specs.append(Spec(a_shape, a_colour, _scale(rng, size, _MEDIUM)))
    if rng.integers(2):  # a decoy with the anchor's shape, so the anchor needs its colour too
        specs.append(Spec(a_shape, pick(rng, list(COLOURS), [a_colour]), _scale(rng, size, _MEDIUM)))
    specs += _fillers(rng, size, int(rng.integers(0, 6 - len(specs) + 1)), [shape], [(a_colour, a_shape)])

    def resolve(objs: list[Placed], rng: np.random.Generator) -> tuple[list[int], int, list[str]] | None:
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
        templates = RELATION_TEMPLATES[mode]
        return [target], anchor, phrasings(rng, templates, c=colour, s=shape, ac=a_colour, **{"as": a_shape})

    return specs, resolve


def _multi_target(rng: np.random.Generator, size: int) -> tuple[list[Spec], Resolver]:
    """2-4 objects of one colour ("all the red objects"), shape ("both triangles") or both ("every red
    circle"), among distractors that share the other attribute, so neither cue alone picks the group."""
    kind = ("colour", "shape", "pair")[int(rng.integers(3))]
    n = int(rng.integers(2, 5))
    shape, colour = pick(rng, SHAPES), pick(rng, list(COLOURS))
    if kind == "colour":
        specs = [Spec(pick(rng, SHAPES), colour, _scale(rng, size, _MEDIUM)) for _ in range(n)]
        specs.append(Spec(specs[0].shape, pick(rng, list(COLOURS), [colour]), _scale(rng, size, _MEDIUM)))
        bad_shapes: list[str] = []
        bad_pairs = [(colour, s) for s in SHAPES]
    elif kind == "shape":
        specs = [Spec(shape, pick(rng, list(COLOURS)), _scale(rng, size, _MEDIUM)) for _ in range(n)]
        specs.append(Spec(pick(rng, SHAPES, [shape]), specs[0].colour, _scale(rng, size, _MEDIUM)))
        bad_shapes, bad_pairs = [shape], []
    else:
        specs = [Spec(shape, colour, _scale(rng, size, _MEDIUM)) for _ in range(n)]
        specs.append(Spec(pick(rng, SHAPES, [shape]), colour, _scale(rng, size, _MEDIUM)))
        specs.append(Spec(shape, pick(rng, list(COLOURS), [colour]), _scale(rng, size, _MEDIUM)))
        bad_shapes, bad_pairs = [], [(colour, shape)]
    specs += _fillers(rng, size, int(rng.integers(0, 6 - len(specs) + 1)), bad_shapes, bad_pairs)
    counted = MULTI_BOTH[kind] if n == 2 else MULTI_ALL_N[kind]
    templates = MULTI_TEMPLATES[kind] + MULTI_COUNTED[kind] + counted

    def matches(spec: Spec) -> bool:
        return (kind == "shape" or spec.colour == colour) and (kind == "colour" or spec.shape == shape)

    def resolve(objs: list[Placed], rng: np.random.Generator) -> tuple[list[int], None, list[str]]:
        targets = [i for i, o in enumerate(objs) if matches(o.spec)]
        return targets, None, phrasings(rng, templates, c=colour, s=shape, n=NUMBERS[n])

    return specs, resolve


BUILDERS: dict[str, Callable[[np.random.Generator, int], tuple[list[Spec], Resolver]]] = {
    "colour_shape": _colour_shape,
    "size": _size,
    "position": _position,
    "relation": _relation,
    MULTI_TARGET: _multi_target,
}


def hide_referent(
    family: str, specs: list[Spec], target: int, anchor: int | None, rng: np.random.Generator
) -> list[Spec]:
    """The objects of a resolved ``family`` scene, changed so that its expression refers to nothing.

    ``specs`` are the placed objects' specs, ``target``/``anchor`` what the expression resolved to.
    ``colour_shape``: the target changes colour or shape, so its pair is gone while objects sharing
    its colour and its shape stay. ``size``/``position``: every object of the target's shape takes
    another shape (the same one for all, keeping colour and size: the same scene but for the
    noun). ``relation``: either the anchor changes colour (its shape stays, so a same-shape decoy
    remains plausible) or every candidate takes another shape, the anchor's excluded.
    """
    out = [Spec(s.shape, s.colour, s.scale) for s in specs]
    t = out[target]
    if family == "colour_shape":
        if rng.integers(2):
            t.colour = pick(rng, list(COLOURS), [t.colour])
        else:
            t.shape = pick(rng, SHAPES, [t.shape])
        return out
    if family == "relation" and anchor is not None and rng.integers(2):
        out[anchor].colour = pick(rng, list(COLOURS), [out[anchor].colour])
        return out
    shape = t.shape
    excluded = [shape] if anchor is None else [shape, out[anchor].shape]
    new = pick(rng, SHAPES, excluded)
    for s in out:
        if s.shape == shape:
            s.shape = new
    return out
