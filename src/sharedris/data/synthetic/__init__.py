"""Deterministic procedural referring scenes: the default dataset, CPU benchmark and test fixture source.

Every sample is an image of coloured shapes, one referring expression and the boolean mask of what
it refers to. Two worlds (``WORLDS``): ``flat``, 3-6 flat shapes in layouts built around each
expression, and ``varied``, 1-10 objects drawn independently or as constructed hard cases, with
unnamed shapes and many renderings (``compose`` and ``paint``), in which nothing but the
expression tells whether anything matches.

Four families (``FAMILIES``) identify exactly one object (the target); in the flat world each is
built so that no single cue solves it (distractors share the target's colour or shape):
``colour_shape`` ("the red circle"), ``size`` ("the small square"), ``position`` ("the leftmost
star") and ``relation`` ("the circle closest to the purple triangle"). ``GENERAL_FAMILIES`` adds
generalised referring: ``no_target`` (an expression of those four whose referent is missing from
the scene: empty mask) and ``multi_target`` ("all the red objects", "both triangles": the union).

A sample depends only on ``(split, seed, index)``, and splits never share scenes. Objects never
overlap (rejection sampling with a gap), so each mask is exactly the pixels drawn for its object.

Modules, by job:

- ``geometry``: the shapes and colours, unit polygons, rasterising and non-overlapping placement.
- ``families``: the expression families: which objects a scene gets, templates and resolvers.
- ``scene``: laying out one scene until its expression is unambiguous, and painting a flat-world image.
- ``compose``: the varied world's layouts and expressions (independent objects, absent and unknown words).
- ``paint``: the varied world's rendering (backgrounds, shades, outlines, anti-aliasing, damage).
- ``dataset``: :class:`SyntheticRefScenes` and its sample type :class:`SyntheticSample`.
- ``refer_format``: :func:`write_refer_format`, the same scenes in the RefCOCO refer layout.
"""

from sharedris.data.synthetic.dataset import SPLITS, SyntheticRefScenes, SyntheticSample
from sharedris.data.synthetic.families import (
    CENTRE_RADIUS,
    FAMILIES,
    GENERAL_FAMILIES,
    MARGIN,
    MULTI_TARGET,
    NO_TARGET,
    SIZE_RATIO,
)
from sharedris.data.synthetic.geometry import COLOUR_JITTER, COLOURS, SHAPES
from sharedris.data.synthetic.phrases import relation_mode
from sharedris.data.synthetic.refer_format import write_refer_format
from sharedris.data.synthetic.scene import NOISE, STYLES, WORLDS

__all__ = [
    "CENTRE_RADIUS",
    "COLOURS",
    "COLOUR_JITTER",
    "FAMILIES",
    "GENERAL_FAMILIES",
    "MARGIN",
    "MULTI_TARGET",
    "NO_TARGET",
    "NOISE",
    "SHAPES",
    "SIZE_RATIO",
    "SPLITS",
    "STYLES",
    "WORLDS",
    "SyntheticRefScenes",
    "SyntheticSample",
    "relation_mode",
    "write_refer_format",
]
