"""The varied world's scenes: what objects a scene holds and what its expression says.

The flat world (:mod:`~sharedris.data.synthetic.scene`) builds every target scene around its
referent (a "red circle" always comes with another red object and another circle) and hides the
referent to make a "nothing matches" scene, so the make-up of a scene alone says whether a target
is there. The varied world removes that cue:

- A target scene is, half the time, a constructed hard case (the flat world's builders, with
  unnamed shapes added), and otherwise 1 to 10 objects drawn independently (shapes and colours
  from a random sub-palette, some objects of shapes no expression names), whose expression is then
  chosen among those the layout makes unambiguous: a target may have no confuser at all.
- A "nothing matches" scene is a target scene of a family drawn from ``phrasings``, laid out by
  the very same code, whose expression is swapped for one in that family's grammar that refers to
  nothing in it (mostly a near miss: "the green star" beside green things and stars), or, for
  ``UNKNOWN_SHARE`` of them, whose own expression has one content word (colour, shape or size)
  replaced by a word outside the world: a made-up word or one of ``OUT_OF_WORLD``. The picture is
  drawn exactly like a target scene's, so neither the count nor the layout tells them apart.
- A scene may be stretched as a non-square picture is when the preprocessing squashes it.
- A training recipe may draw constructed relation scenes with more candidates than evaluation
  splits do (``relation_candidates``).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from sharedris.data.synthetic.families import (
    BUILDERS, CENTRE_RADIUS, MARGIN, MULTI_TARGET, RELATION_CANDIDATES, SIZE_RATIO,
)
from sharedris.data.synthetic.geometry import COLOURS, SHAPES, UNNAMED_SHAPES, Placed, Spec, place
from sharedris.data.synthetic import phrases

INDEPENDENT_SHARE = 0.5  # target scenes of independently drawn objects; the rest are constructed hard cases
UNNAMED_SHARE = 0.12  # chance that an independently drawn object has a shape no expression names
# Scenes stretched as a squashed non-square picture is: their share, and the widest such picture
# (2.5:1 or 1:2.5). Evaluation splits always draw this; a training recipe may draw another.
STRETCH = (0.35, 2.5)
UNKNOWN_SHARE = 0.25  # "nothing matches" scenes whose expression has a word from outside the world
MADE_UP_SHARE = 0.4  # of those, a made-up word rather than a real one
_TRIES = 200

# Words from outside the world, by the kind of word they replace (training only; the held-out
# renderer keeps its own list).
OUT_OF_WORLD: dict[str, tuple[str, ...]] = {
    "colour": ("pink", "brown", "cyan", "black", "white", "grey", "gray", "teal", "magenta", "beige",
               "navy", "maroon", "golden", "silver"),
    "shape": ("cat", "dog", "car", "tree", "house", "person", "rectangle", "oval", "ellipse", "pentagon",
              "heart", "cross", "arrow", "moon", "ring", "cube", "ball", "box", "cup", "bird", "flower",
              "boat", "apple", "chair", "octagon", "line"),
    "size": ("tiny", "huge", "little", "giant", "medium", "tall", "short", "wide", "narrow"),
}
_CONSONANTS, _VOWELS = "bdfgklmnprstvwz", "aeiou"

Option = tuple[list[int], int | None, Sequence[str], dict[str, str]]  # targets, anchor, templates, words


def draw_stretch(rng: np.random.Generator, stretch: tuple[float, float] = STRETCH) -> tuple[float, float]:
    """(x, y) scale of every shape: (1, 1), or, for a share ``stretch[0]`` of scenes, that of a
    picture of aspect up to ``stretch[1]`` (log-uniform, either way round) squashed square."""
    share, widest = stretch
    if rng.random() >= share:
        return (1.0, 1.0)
    aspect = math.exp(rng.uniform(-math.log(widest), math.log(widest)))
    return (math.sqrt(aspect), 1.0 / math.sqrt(aspect))


def target_scene(
    rng: np.random.Generator, family: str, size: int, stretch: tuple[float, float],
    relation_candidates: tuple[int, int] = RELATION_CANDIDATES,
) -> tuple[list[Placed], np.ndarray, list[int], int | None, list[str]]:
    """Objects, label map, targets, anchor and phrasings of one target scene of ``family``.

    ``relation_candidates`` (fewest, most) is how many objects of the named shape a constructed
    ``relation`` scene holds."""
    build = BUILDERS[family]
    if family == "relation":
        build = functools.partial(build, candidates=relation_candidates)
    for _ in range(_TRIES):
        if rng.random() < INDEPENDENT_SHARE:
            specs = _independent_specs(rng, size)
            layout = place(specs, size, rng, stretch)
            options = _OPTIONS[family](layout[0], size, rng) if layout is not None else []
            if options:
                targets, anchor, templates, words = options[int(rng.integers(len(options)))]
                return layout[0], layout[1], targets, anchor, phrases.phrasings(rng, templates, **words)
            continue
        specs, resolve = build(rng, size)
        if family != MULTI_TARGET:  # an unnamed shape would join "all the red objects"
            specs += [Spec(phrases.pick(rng, UNNAMED_SHAPES), phrases.pick(rng, list(COLOURS)), specs[0].scale)
                      for _ in range(int(rng.integers(0, 3)))]
        specs = [specs[i] for i in rng.permutation(len(specs))]  # the target's index varies
        layout = place(specs, size, rng, stretch)
        resolved = resolve(layout[0], rng) if layout is not None else None
        if resolved is not None:
            return layout[0], layout[1], *resolved
    raise RuntimeError(f"could not lay out a {family!r} scene at size {size}")


def absent_texts(rng: np.random.Generator, family: str, objs: list[Placed],
                 texts: list[str]) -> list[str]:
    """Phrasings in ``family``'s grammar that refer to nothing among ``objs``.

    ``texts`` are the scene's own phrasings: ``UNKNOWN_SHARE`` of the time one of them comes back
    with a content word replaced by a word from outside the world.
    """
    if rng.random() < UNKNOWN_SHARE:
        unknown = _with_unknown_word(rng, texts[0])
        if unknown is not None:
            return [unknown]
    templates, words = _ABSENT[family](rng, objs)
    return phrases.phrasings(rng, templates, **words)


def _independent_specs(rng: np.random.Generator, size: int) -> list[Spec]:
    """1-10 objects, each drawn alone from a random sub-palette of shapes and colours."""
    n = int(rng.integers(1, 11))
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[: int(rng.integers(1, len(SHAPES) + 1))]]
    colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))[: int(rng.integers(1, len(COLOURS) + 1))]]
    top = min(0.14, 0.33 / math.sqrt(n))
    specs = []
    for _ in range(n):
        shape = phrases.pick(rng, UNNAMED_SHAPES) if rng.random() < UNNAMED_SHARE else phrases.pick(rng, shapes)
        specs.append(Spec(shape, phrases.pick(rng, colours), float(rng.uniform(0.045, top)) * size))
    return specs


def _by_shape(objs: list[Placed]) -> dict[str, list[int]]:
    """Indices of the objects of each named shape."""
    groups: dict[str, list[int]] = {}
    for i, o in enumerate(objs):
        if o.spec.shape in SHAPES:
            groups.setdefault(o.spec.shape, []).append(i)
    return groups


def _coloured(templates: Sequence[str], objs: list[Placed], cands: list[int]) -> list[str]:
    """``templates``, without those naming the colour unless every candidate has the same colour."""
    same = len({objs[i].spec.colour for i in cands}) == 1
    return [t for t in templates if same or "{c}" not in t]


def _colour_shape_options(objs: list[Placed], size: int, rng: np.random.Generator) -> list[Option]:
    pairs = Counter((o.spec.colour, o.spec.shape) for o in objs)
    return [([i], None, phrases.COLOUR_SHAPE_TEMPLATES, {"c": o.spec.colour, "s": o.spec.shape})
            for i, o in enumerate(objs) if o.spec.shape in SHAPES and pairs[o.spec.colour, o.spec.shape] == 1]


def _size_options(objs: list[Placed], size: int, rng: np.random.Generator) -> list[Option]:
    out: list[Option] = []
    for shape, cands in _by_shape(objs).items():
        if len(cands) < 2:
            continue
        order = sorted(cands, key=lambda i: objs[i].spec.scale)
        extra = {2: phrases.SIZE_PAIR_TEMPLATES, 3: phrases.SIZE_TRIO_TEMPLATES}.get(len(cands), ())
        templates = _coloured(phrases.SIZE_TEMPLATES + extra, objs, cands)
        words = {"s": shape, "c": objs[order[0]].spec.colour}
        if objs[order[-1]].spec.scale >= SIZE_RATIO * objs[order[-2]].spec.scale:
            out.append(([order[-1]], None, templates, {**words, **_size_words(rng, True)}))
        if objs[order[1]].spec.scale >= SIZE_RATIO * objs[order[0]].spec.scale:
            out.append(([order[0]], None, templates, {**words, **_size_words(rng, False)}))
    return out


def _size_words(rng: np.random.Generator, big: bool) -> dict[str, str]:
    if big:
        return {"a": phrases.pick(rng, phrases.BIG_WORDS), "sup": phrases.pick(rng, phrases.BIGGEST_WORDS),
                "cmp": phrases.pick(rng, phrases.BIGGER_WORDS)}
    return {"a": "small", "sup": "smallest", "cmp": "smaller"}


def _position_options(objs: list[Placed], size: int, rng: np.random.Generator) -> list[Option]:
    out: list[Option] = []
    for shape, cands in _by_shape(objs).items():
        if len(cands) < 2:
            continue
        xy = np.array([objs[i].centre for i in cands])
        keys = {"left": xy[:, 0], "right": -xy[:, 0], "top": xy[:, 1], "bottom": -xy[:, 1],
                "middle": np.linalg.norm(xy - size / 2, axis=1)}  # smaller is more extreme
        for direction, key in keys.items():
            order = np.argsort(key)
            near_centre = direction != "middle" or key[order[0]] <= CENTRE_RADIUS * size
            if key[order[1]] - key[order[0]] >= MARGIN * size and near_centre:
                target = cands[int(order[0])]
                templates = _coloured(phrases.POSITION_TEMPLATES[direction], objs, cands)
                out.append(([target], None, templates, {"s": shape, "c": objs[target].spec.colour}))
    return out


def _relation_options(objs: list[Placed], size: int, rng: np.random.Generator) -> list[Option]:
    pairs = Counter((o.spec.colour, o.spec.shape) for o in objs)
    out: list[Option] = []
    for shape, cands in _by_shape(objs).items():
        if len(cands) < 2:
            continue
        for anchor, a in enumerate(objs):
            if a.spec.shape not in SHAPES or a.spec.shape == shape or pairs[a.spec.colour, a.spec.shape] > 1:
                continue
            dist = np.array([math.dist(objs[i].centre, a.centre) for i in cands])
            order = np.argsort(dist)
            words = {"s": shape, "c": objs[cands[0]].spec.colour, "ac": a.spec.colour, "as": a.spec.shape}
            for mode, first, second in (("near", 0, 1), ("far", -1, -2)):
                if abs(dist[order[first]] - dist[order[second]]) >= MARGIN * size:
                    templates = _coloured(phrases.RELATION_TEMPLATES[mode], objs, cands)
                    out.append(([cands[int(order[first])]], anchor, templates, words))
    return out


def _multi_templates(kind: str, n: int) -> tuple[str, ...]:
    if n not in phrases.NUMBERS:
        return phrases.MULTI_TEMPLATES[kind]
    counted = phrases.MULTI_BOTH[kind] if n == 2 else phrases.MULTI_ALL_N[kind]
    return phrases.MULTI_TEMPLATES[kind] + phrases.MULTI_COUNTED[kind] + counted


def _multi_options(objs: list[Placed], size: int, rng: np.random.Generator) -> list[Option]:
    groups: dict[tuple[str, str, str], list[int]] = {}
    for i, o in enumerate(objs):
        groups.setdefault(("colour", o.spec.colour, ""), []).append(i)
        if o.spec.shape in SHAPES:
            groups.setdefault(("shape", "", o.spec.shape), []).append(i)
            groups.setdefault(("pair", o.spec.colour, o.spec.shape), []).append(i)
    return [(members, None, _multi_templates(kind, len(members)),
             {"c": c, "s": s, "n": phrases.NUMBERS.get(len(members), "")})
            for (kind, c, s), members in groups.items() if len(members) >= 2]


_OPTIONS = {
    "colour_shape": _colour_shape_options,
    "size": _size_options,
    "position": _position_options,
    "relation": _relation_options,
    MULTI_TARGET: _multi_options,
}


def _absent_pair(rng: np.random.Generator, objs: list[Placed]) -> tuple[str, str]:
    """A (colour, shape) pair no object has; mostly a near miss sharing a colour or a shape with one."""
    present = {(o.spec.colour, o.spec.shape) for o in objs}
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    near = [(c, s) for c, s in absent if any(c == o.spec.colour or s == o.spec.shape for o in objs)]
    pool = near if near and rng.random() < 0.75 else absent
    return pool[int(rng.integers(len(pool)))]


def _absent_shape(rng: np.random.Generator, objs: list[Placed]) -> str | None:
    missing = [s for s in SHAPES if all(o.spec.shape != s for o in objs)]
    return missing[int(rng.integers(len(missing)))] if missing else None


def _absent_noun_phrase(
    rng: np.random.Generator, objs: list[Placed], groups: Sequence[Sequence[str]]
) -> tuple[list[str], dict[str, str]]:
    """Templates of one of ``groups`` and words that make them refer to nothing: an absent shape (any
    colour), or, when every shape is present or by chance, an absent pair with the colour named."""
    templates = list(groups[int(rng.integers(len(groups)))])
    shape = _absent_shape(rng, objs)
    coloured = [t for t in templates if "{c}" in t]
    if shape is None or (coloured and rng.random() < 0.3):
        colour, shape = _absent_pair(rng, objs)
        return coloured or [t for g in groups for t in g if "{c}" in t], {"c": colour, "s": shape}
    return templates, {"c": phrases.pick(rng, list(COLOURS)), "s": shape}


def _absent_colour_shape(rng: np.random.Generator, objs: list[Placed]) -> tuple[Sequence[str], dict[str, str]]:
    colour, shape = _absent_pair(rng, objs)
    return phrases.COLOUR_SHAPE_TEMPLATES, {"c": colour, "s": shape}


def _absent_size(rng: np.random.Generator, objs: list[Placed]) -> tuple[Sequence[str], dict[str, str]]:
    templates, words = _absent_noun_phrase(
        rng, objs, (phrases.SIZE_TEMPLATES, phrases.SIZE_PAIR_TEMPLATES, phrases.SIZE_TRIO_TEMPLATES))
    return templates, {**words, **_size_words(rng, bool(rng.integers(2)))}


def _absent_position(rng: np.random.Generator, objs: list[Placed]) -> tuple[Sequence[str], dict[str, str]]:
    return _absent_noun_phrase(rng, objs, list(phrases.POSITION_TEMPLATES.values()))


def _absent_relation(rng: np.random.Generator, objs: list[Placed]) -> tuple[Sequence[str], dict[str, str]]:
    """The anchor is missing, or nothing of the named shape is there."""
    templates = phrases.RELATION_TEMPLATES[("near", "far")[int(rng.integers(2))]]
    if rng.integers(2):
        a_colour, a_shape = _absent_pair(rng, objs)
        return templates, {"c": phrases.pick(rng, list(COLOURS)), "s": phrases.pick(rng, SHAPES, [a_shape]),
                           "ac": a_colour, "as": a_shape}
    templates, words = _absent_noun_phrase(rng, objs, [templates])
    a_shape = phrases.pick(rng, SHAPES, [words["s"]])
    return templates, {**words, "ac": phrases.pick(rng, list(COLOURS)), "as": a_shape}


def _absent_multi(rng: np.random.Generator, objs: list[Placed]) -> tuple[Sequence[str], dict[str, str]]:
    kind = ("colour", "shape", "pair")[int(rng.integers(3))]
    colour, shape = _absent_pair(rng, objs)
    missing_colours = [c for c in COLOURS if all(o.spec.colour != c for o in objs)]
    missing_shape = _absent_shape(rng, objs)
    if kind == "colour" and missing_colours:
        colour = missing_colours[int(rng.integers(len(missing_colours)))]
    elif kind == "shape" and missing_shape is not None:
        shape = missing_shape
    else:
        kind = "pair"
    n = int(rng.integers(2, 5))
    return _multi_templates(kind, n), {"c": colour, "s": shape, "n": phrases.NUMBERS[n]}


_ABSENT = {
    "colour_shape": _absent_colour_shape,
    "size": _absent_size,
    "position": _absent_position,
    "relation": _absent_relation,
    MULTI_TARGET: _absent_multi,
}

_KIND_OF_WORD = {**{c: "colour" for c in COLOURS}, **{s: "shape" for s in SHAPES},
                 **{s + "s": "shape" for s in SHAPES},
                 **{w: "size" for w in ("small", "smallest", "smaller") + phrases.BIG_WORDS + phrases.BIGGEST_WORDS
                    + phrases.BIGGER_WORDS}}


def made_up_word(rng: np.random.Generator) -> str:
    """A pronounceable word of 2-3 syllables that no expression of the world uses."""
    while True:
        word = "".join(phrases.pick(rng, _CONSONANTS) + phrases.pick(rng, _VOWELS)
                       for _ in range(int(rng.integers(2, 4))))
        if rng.integers(2):
            word += phrases.pick(rng, _CONSONANTS)
        if word not in _KIND_OF_WORD and word not in OUT_OF_WORLD["shape"]:
            return word


def _with_unknown_word(rng: np.random.Generator, text: str) -> str | None:
    """``text`` with one colour, shape or size word replaced by a word from outside the world."""
    words = text.split()
    slots = [i for i, w in enumerate(words) if w in _KIND_OF_WORD]
    if not slots:
        return None
    i = slots[int(rng.integers(len(slots)))]
    kind = _KIND_OF_WORD[words[i]]
    new = made_up_word(rng) if rng.random() < MADE_UP_SHARE else phrases.pick(rng, OUT_OF_WORLD[kind])
    plural = kind == "shape" and words[i].endswith("s") and words[i][:-1] in SHAPES
    words[i] = new + "s" if plural else new
    return " ".join(words)
