"""``SyntheticRefScenes``: the indexable source of synthetic referring scenes.

A sample depends only on ``(split, seed, index)``: its generator is
``numpy.random.default_rng([SPLITS[split], seed, index])`` and split codes differ, so splits never
share scenes.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

from sharedris.data.sample import RefSample
from sharedris.data.synthetic.families import (
    FAMILIES, GENERAL_FAMILIES, MAX_RELATION_CANDIDATES, MULTI_TARGET, NO_TARGET, RELATION_CANDIDATES,
)
from sharedris.data.synthetic.families import vocabulary as expression_words
from sharedris.data.synthetic.compose import STRETCH
from sharedris.data.synthetic.geometry import COLOURS, SHAPES
from sharedris.data.synthetic.geometry import UNNAMED_SHAPES
from sharedris.data.synthetic.paint import BACKGROUNDS, paint
from sharedris.data.synthetic.scene import STYLES, WORLDS, Scene, lay_out, render

SPLITS: dict[str, int] = {"train": 1, "val": 2, "test": 3, "testA": 4, "testB": 5}
# Non-zero 4th entropy word of the auxiliary RNGs (text shuffle, refer writer): SeedSequence pads
# short entropy with zeros, so without it such a stream could equal a sample's.
AUX_TAG = 7919


def _listing(words: list[str], last: str = "and") -> str:
    """English enumeration: "a, b and c"; one word alone."""
    return f"{', '.join(words[:-1])} {last} {words[-1]}" if len(words) > 1 else words[0]


def _description(styles: Sequence[str], world: str = "flat") -> str:
    """What the scenes are, in one phrase that reads after "trained on"."""
    if world == "varied":
        unnamed = [s + ("es" if s.endswith("s") else "s") for s in UNNAMED_SHAPES]
        kinds = {"plain": "plain grey", "light": "light", "dark": "dark", "tinted": "tinted", "gradient": "graded",
                 "texture": "textured", "noisy": "noisy"}
        return (f"synthetic shape scenes: 1 to 10 {_listing([s + 's' for s in SHAPES])} in shades of "
                f"{_listing(list(COLOURS))}, among unnamed {_listing(unnamed, 'or')}, "
                f"on {_listing([kinds[b] for b in BACKGROUNDS], 'or')} backgrounds, with hard or soft edges, "
                "outlines, shading, blur, noise and JPEG artefacts")
    backgrounds = {"texture": "textured", "plain": "plain", "gradient": "graded", "stripes": "striped"}
    kinds = _listing([backgrounds[s] for s in dict.fromkeys(styles)], "or")
    return (f"synthetic shape scenes: 3 to 6 flat-coloured {_listing([s + 's' for s in SHAPES])} in "
            f"{_listing(list(COLOURS))} on a {kinds} grey background")


class SyntheticSample(RefSample):
    """A synthetic scene: the :class:`RefSample` keys plus what the generator knows about it.

    ann_ids: the referred objects' indices within the scene (positions in ``objects``), not ids of
        any annotation file: ``[target]`` for the four target families, 2-4 indices for
        ``multi_target``, empty for ``no_target``.
    group: the scene's expression family (= ``family``).
    texts: all valid phrasings of the expression, ``text`` first.
    family: the expression family, one of ``GENERAL_FAMILIES``.
    no_target: True exactly when the expression refers to nothing (``family == "no_target"``).
    phrased_as: the family whose grammar the expression follows: ``family``, except for
        ``no_target`` (whose expressions are drawn as one of the four target families draws them)
        and with ``shuffle_texts`` (the family of the scene the text comes from).
    targets: the referred objects' indices (= ``ann_ids``).
    objects: per object: shape, category (= shape: the object's class, one of
        ``SyntheticRefScenes.object_classes``, as the refer export writes it), colour, rgb, centre
        (x, y in pixels), scale (equivalent radius in pixels), rotation (degrees), bbox (pixel bbox
        [x, y, w, h] of its mask), polygon (flat [x1, y1, ...]), area (mask pixels).
    target: the referred object's index in the four target families, None otherwise.
    anchor: the anchor object's index in ``relation`` scenes, None otherwise (no_target too).
    labels: uint8 (H, W): ``k + 1`` on object ``k``, 0 on the background.
    style: the background style: one of ``STYLES`` (flat world) or ``BACKGROUNDS`` (varied world).
    split: the split name.
    index: the scene number (differs from the item index after ``set_epoch`` with ``fresh_epochs``).
    """

    texts: list[str]
    family: str
    no_target: bool
    phrased_as: str
    targets: list[int]
    objects: list[dict[str, Any]]
    target: int | None
    anchor: int | None
    labels: np.ndarray
    style: str
    split: str
    index: int


class SyntheticRefScenes:
    """A deterministic, torch-free dataset of synthetic referring scenes.

    ``ds[i]`` is a :class:`SyntheticSample`: a ``size`` x ``size`` image, the referred objects' mask
    (their union; all False for ``no_target``), the expression and its alternative phrasings, and the
    scene's objects, targets, anchor and label map.

    Each scene's family is drawn uniformly from ``families`` (any of ``GENERAL_FAMILIES``); list a
    family twice to draw it twice as often. With ``balanced``, scene n is of family
    ``families[n % len(families)]`` instead, so every family gets the same share of a split
    (evaluation). ``groups`` is every family in ``GENERAL_FAMILIES`` order whatever ``families`` is:
    the breakdown evaluation reports. With ``fresh_epochs``, ``set_epoch(e)`` moves the dataset to
    its e-th block of ``length`` scenes (sample i is scene ``e * length + i``, and ``index`` is that
    scene number), so training never repeats a scene; otherwise ``set_epoch`` changes nothing.

    With ``shuffle_texts`` (and ``length >= 2``) the ``text``/``texts`` of sample i come from another
    sample of the same block (a fixed derangement), so text carries no information while images and
    masks stay: a control experiment. ``family`` stays the family of the scene, not of the text.

    A ``no_target`` scene borrows the expression of a target family drawn uniformly from
    ``no_target_phrasings`` (the four by default; list one twice to draw it twice as often).

    Each scene's background style is drawn uniformly from ``styles`` (``STYLES``: ``texture``, the
    default, ``plain``, ``gradient``, ``stripes``); it is drawn last, so the scenes of the default
    style do not depend on which others are offered.

    ``world`` (``WORLDS``) picks how scenes are made: ``flat`` (3-6 flat shapes in constructed
    layouts, "nothing matches" by hiding the referent, the ``styles`` above) or ``varied``
    (:mod:`~sharedris.data.synthetic.compose` and :mod:`~sharedris.data.synthetic.paint`: 1-10
    objects, independent or constructed, unnamed shapes, "nothing matches" scenes drawn exactly like
    target scenes, many backgrounds and renderings; ``styles`` does not apply, and
    ``no_target_phrasings`` may also name ``multi_target``). In the varied world, ``stretch`` is
    (share of scenes, widest aspect) stretched as a squashed non-square picture is, and
    ``relation_candidates`` (fewest, most; 2 to ``MAX_RELATION_CANDIDATES``) how many objects of
    the named shape a constructed relation scene holds; evaluation splits keep the world's own,
    ``STRETCH`` and ``RELATION_CANDIDATES``.

    ``vocabulary`` is every word an expression of ``families`` can contain (on the class: of every
    family) and ``description`` says what the scenes are: a model trained on them knows nothing else.
    """

    object_classes: tuple[str, ...] = SHAPES
    groups: tuple[str, ...] = GENERAL_FAMILIES
    vocabulary: frozenset[str] = expression_words(GENERAL_FAMILIES)  # an instance's: of its families
    description: str = _description(("texture",))  # an instance's says which styles it draws

    def __init__(
        self,
        split: str = "train",
        size: int = 160,
        length: int = 10000,
        seed: int = 0,
        families: Sequence[str] = FAMILIES,
        shuffle_texts: bool = False,
        fresh_epochs: bool = False,
        balanced: bool = False,
        styles: Sequence[str] = ("texture",),
        no_target_phrasings: Sequence[str] = FAMILIES,
        world: str = "flat",
        stretch: tuple[float, float] = STRETCH,
        relation_candidates: tuple[int, int] = RELATION_CANDIDATES,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        unknown = [f for f in families if f not in GENERAL_FAMILIES]
        if unknown or not families:
            raise ValueError(f"families must be a non-empty list of names from {GENERAL_FAMILIES}, "
                             f"got {list(families)}")
        if world not in WORLDS:
            raise ValueError(f"unknown world {world!r}; choose one of {', '.join(WORLDS)}")
        phrasing_families = FAMILIES + ((MULTI_TARGET,) if world == "varied" else ())
        if not no_target_phrasings or not set(no_target_phrasings) <= set(phrasing_families):
            raise ValueError(f"no_target_phrasings must be a non-empty list of names from {phrasing_families}, "
                             f"got {list(no_target_phrasings)}")
        if not styles or not set(styles) <= set(STYLES):
            raise ValueError(f"styles must be a non-empty list of names from {STYLES}, got {list(styles)}")
        if not (0 <= stretch[0] <= 1 and stretch[1] >= 1):
            raise ValueError(f"stretch must be (share of scenes in [0, 1], widest aspect >= 1), got {tuple(stretch)}")
        fewest, most = relation_candidates
        if not 2 <= fewest <= most <= MAX_RELATION_CANDIDATES:
            raise ValueError(f"relation_candidates must be (fewest, most) with 2 <= fewest <= most <= "
                             f"{MAX_RELATION_CANDIDATES}, got {tuple(relation_candidates)}")
        if size < 64:
            raise ValueError(f"size must be >= 64 to fit the objects, got {size}")
        if length < 0 or seed < 0:
            raise ValueError(f"length and seed must be >= 0, got length={length}, seed={seed}")
        self.split, self.size, self.length, self.seed = split, size, length, seed
        self.families = tuple(families)
        self.shuffle_texts = shuffle_texts
        self.fresh_epochs = fresh_epochs
        self.balanced = balanced
        self.styles = tuple(styles)
        self.no_target_phrasings = tuple(no_target_phrasings)
        self.world = world
        self.stretch = (float(stretch[0]), float(stretch[1]))
        self.relation_candidates = (int(fewest), int(most))
        self.vocabulary = expression_words(self.families)
        self.description = _description(self.styles, world)
        self._first = 0  # scene number of sample 0
        self._text_source: np.ndarray | None = None
        if shuffle_texts and length > 1:
            # Each sample takes the text of its successor on one random cycle: no sample keeps its own.
            cycle = np.random.default_rng([SPLITS[split], seed, length, AUX_TAG]).permutation(length)
            self._text_source = np.empty(length, dtype=np.int64)
            self._text_source[cycle] = np.roll(cycle, -1)

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """With ``fresh_epochs``, serve epoch ``epoch``'s block of scenes; a no-op otherwise."""
        if self.fresh_epochs:
            self._first = epoch * self.length

    def _lay_out(self, number: int) -> tuple[Scene, np.random.Generator]:
        """Scene ``number`` laid out, and its generator, ready to paint it."""
        rng = np.random.default_rng([SPLITS[self.split], self.seed, number])
        if self.balanced:
            family = self.families[number % len(self.families)]
        else:
            family = self.families[int(rng.integers(len(self.families)))]
        return lay_out(rng, family, self.size, self.no_target_phrasings, self.world, self.stretch,
                       self.relation_candidates), rng

    def __getitem__(self, index: int) -> SyntheticSample:
        index = operator.index(index)
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        index %= self.length
        scene, rng = self._lay_out(self._first + index)
        if self.world == "varied":
            image, style = paint(scene.labels, scene.objects, rng)
        else:
            image, style = render(scene.labels, scene.objects, rng, self.styles)
        texts, phrased_as = scene.texts, scene.phrased_as
        if self._text_source is not None:
            told = self._lay_out(self._first + int(self._text_source[index]))[0]
            texts, phrased_as = told.texts, told.phrased_as
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
        referred = np.zeros(len(objects) + 1, dtype=bool)  # by label: the referred objects' labels
        referred[[t + 1 for t in scene.targets]] = True
        return {
            "image": image,
            "mask": referred[scene.labels],
            "text": texts[0],
            "ann_ids": list(scene.targets),
            "group": scene.family,
            "texts": list(texts),
            "family": scene.family,
            "no_target": scene.family == NO_TARGET,
            "phrased_as": phrased_as,
            "targets": list(scene.targets),
            "objects": objects,
            "target": scene.targets[0] if scene.family in FAMILIES else None,
            "anchor": scene.anchor,
            "labels": scene.labels,
            "style": style,
            "split": self.split,
            "index": self._first + index,
        }
