"""The words of the synthetic world's expressions: templates, word lists and how they are filled.

Shared by the expression families (``families``) and the varied world's composer (``compose``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sharedris.data.synthetic.geometry import COLOURS, SHAPES

# Templates: {c}/{s} the referent's colour/shape, {ac}/{as} the anchor's, {a}/{sup}/{cmp} a size
# adjective, superlative, comparative, {n} a number word. ``vocabulary`` expands them.
BIG_WORDS, BIGGEST_WORDS, BIGGER_WORDS = ("big", "large"), ("biggest", "largest"), ("bigger", "larger")
NUMBERS = {2: "two", 3: "three", 4: "four"}
COLOUR_SHAPE_TEMPLATES = ("the {c} {s}", "{c} {s}", "the {s} that is {c}", "the {c} {s} in the picture")
SIZE_TEMPLATES = ("the {a} {s}", "the {a} {c} {s}", "the {sup} {s}")
SIZE_PAIR_TEMPLATES = ("the {cmp} {s}", "the {cmp} {c} {s}", "the {cmp} of the two {s}s")
SIZE_TRIO_TEMPLATES = ("the {sup} {c} {s}",)
POSITION_TEMPLATES = {
    "left": ("the {s} on the left", "the leftmost {s}", "the {c} {s} on the far left",
             "the {s} furthest to the left"),
    "right": ("the {s} on the right", "the rightmost {s}", "the {c} {s} on the far right",
              "the {s} furthest to the right"),
    "top": ("the {s} at the top", "the topmost {s}", "the highest {s}", "the {c} {s} at the top"),
    "bottom": ("the {s} at the bottom", "the bottom {s}", "the lowest {s}", "the {c} {s} at the bottom"),
    "middle": ("the {s} in the middle", "the {s} in the centre", "the central {s}",
               "the {c} {s} in the middle"),
}
RELATION_TEMPLATES = {
    "near": ("the {s} closest to the {ac} {as}", "the {c} {s} next to the {ac} {as}",
             "the {s} nearest to the {ac} {as}"),
    "far": ("the {s} farthest from the {ac} {as}", "the {c} {s} furthest from the {ac} {as}",
            "the {s} far from the {ac} {as}"),
}
# multi_target, per kind of group: every form, then the counted forms ("both" for two, "all {n}" for more).
MULTI_TEMPLATES = {
    "colour": ("all the {c} objects", "all {c} shapes", "all the {c} shapes", "every {c} object",
               "every {c} shape", "the {c} objects", "the {c} shapes", "all the {c} things"),
    "shape": ("all the {s}s", "all {s}s", "every {s}", "each {s}", "the {s}s"),
    "pair": ("all the {c} {s}s", "all {c} {s}s", "every {c} {s}", "the {c} {s}s"),
}
MULTI_COUNTED = {
    "colour": ("the {n} {c} objects", "the {n} {c} shapes"),
    "shape": ("the {n} {s}s",),
    "pair": ("the {n} {c} {s}s",),
}
MULTI_BOTH = {
    "colour": ("both {c} objects", "both {c} shapes"),
    "shape": ("both {s}s",),
    "pair": ("both {c} {s}s",),
}
MULTI_ALL_N = {
    "colour": ("all {n} {c} objects",),
    "shape": ("all {n} {s}s",),
    "pair": ("all {n} {c} {s}s",),
}
SLOT_WORDS: dict[str, tuple[str, ...]] = {
    "c": tuple(COLOURS), "ac": tuple(COLOURS), "s": SHAPES, "as": SHAPES,
    "a": BIG_WORDS + ("small",), "sup": BIGGEST_WORDS + ("smallest",), "cmp": BIGGER_WORDS + ("smaller",),
    "n": tuple(NUMBERS.values()),
}


def pick(rng: np.random.Generator, items: Sequence[str], exclude: Sequence[str] = ()) -> str:
    """Uniform choice among ``items`` not in ``exclude``."""
    pool = [x for x in items if x not in exclude]
    return pool[int(rng.integers(len(pool)))]


def phrasings(rng: np.random.Generator, templates: Sequence[str], **words: str) -> list[str]:
    """Fill templates, drop duplicates, and shuffle: the first is the sample's text."""
    texts = list(dict.fromkeys(t.format(**words) for t in templates))
    return [texts[i] for i in rng.permutation(len(texts))]


def relation_mode(text: str) -> str:
    """``"near"`` or ``"far"``: the mode of ``RELATION_TEMPLATES`` a relation expression was filled
    from, told by the words between the referent's shape and the anchor ("closest to", "farthest
    from", ...)."""
    for mode, templates in RELATION_TEMPLATES.items():
        if any(f" {t.split('{s} ')[1].split(' the {ac}')[0]} " in f" {text} " for t in templates):
            return mode
    raise ValueError(f"not a relation expression of the synthetic world: {text!r}")
