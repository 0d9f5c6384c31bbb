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
from sharedris.data.synthetic.families import FAMILIES
from sharedris.data.synthetic.geometry import SHAPES
from sharedris.data.synthetic.scene import lay_out, render

SPLITS: dict[str, int] = {"train": 1, "val": 2, "test": 3, "testA": 4, "testB": 5}
# Non-zero 4th entropy word of the auxiliary RNGs (text shuffle, refer writer): SeedSequence pads
# short entropy with zeros, so without it such a stream could equal a sample's.
AUX_TAG = 7919


class SyntheticSample(RefSample):
    """A synthetic scene: the :class:`RefSample` keys plus what the generator knows about it.

    ann_ids: ``[target]``: object indices within the scene (positions in ``objects``), not ids of
        any annotation file.
    group: the scene's expression family (= ``family``).
    texts: all valid phrasings of the expression, ``text`` first.
    family: the expression family, one of ``FAMILIES``.
    objects: per object: shape, category (= shape: the object's class, one of
        ``SyntheticRefScenes.object_classes``, as the refer export writes it), colour, rgb, centre
        (x, y in pixels), scale (equivalent radius in pixels), rotation (degrees), bbox (pixel bbox
        [x, y, w, h] of its mask), polygon (flat [x1, y1, ...]), area (mask pixels).
    target: the referred object's index.
    anchor: the anchor object's index in ``relation`` scenes, None otherwise.
    labels: uint8 (H, W): ``k + 1`` on object ``k``, 0 on the background.
    split: the split name.
    index: the scene number (differs from the item index after ``set_epoch`` with ``fresh_epochs``).
    """

    texts: list[str]
    family: str
    objects: list[dict[str, Any]]
    target: int
    anchor: int | None
    labels: np.ndarray
    split: str
    index: int


class SyntheticRefScenes:
    """A deterministic, torch-free dataset of synthetic referring scenes.

    ``ds[i]`` is a :class:`SyntheticSample`: a ``size`` x ``size`` image, the target's mask, the
    expression and its alternative phrasings, and the scene's objects, target, anchor and label map.

    Each scene's family is drawn uniformly from ``families``; list a family twice to draw it twice as
    often. ``groups`` is every family in ``FAMILIES`` order whatever ``families`` is: the breakdown
    evaluation reports. With ``fresh_epochs``, ``set_epoch(e)`` moves the dataset to its e-th block of
    ``length`` scenes (sample i is scene ``e * length + i``, and ``index`` is that scene number), so
    training never repeats a scene; otherwise ``set_epoch`` changes nothing.

    With ``shuffle_texts`` (and ``length >= 2``) the ``text``/``texts`` of sample i come from another
    sample of the same block (a fixed derangement), so text carries no information while images and
    masks stay: a control experiment. ``family`` stays the family of the scene, not of the text.
    """

    object_classes: tuple[str, ...] = SHAPES
    groups: tuple[str, ...] = FAMILIES

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
            cycle = np.random.default_rng([SPLITS[split], seed, length, AUX_TAG]).permutation(length)
            self._text_source = np.empty(length, dtype=np.int64)
            self._text_source[cycle] = np.roll(cycle, -1)

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """With ``fresh_epochs``, serve epoch ``epoch``'s block of scenes; a no-op otherwise."""
        if self.fresh_epochs:
            self._first = epoch * self.length

    def __getitem__(self, index: int) -> SyntheticSample:
        index = operator.index(index)
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        index %= self.length
        rng = np.random.default_rng([SPLITS[self.split], self.seed, self._first + index])
        scene = lay_out(rng, self.families, self.size)
        image = render(scene.labels, scene.objects, rng)
        texts = scene.texts
        if self._text_source is not None:
            donor = self._first + int(self._text_source[index])
            donor_rng = np.random.default_rng([SPLITS[self.split], self.seed, donor])
            texts = lay_out(donor_rng, self.families, self.size).texts
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
            "ann_ids": [scene.target],
            "group": scene.family,
            "texts": list(texts),
            "family": scene.family,
            "objects": objects,
            "target": scene.target,
            "anchor": scene.anchor,
            "labels": scene.labels,
            "split": self.split,
            "index": self._first + index,
        }
