"""One scene from its generator: lay the objects out until the expression is unambiguous, then paint.

Both steps draw from the same ``numpy`` generator, in this order (lay-out, then painting), so a
scene is a pure function of the generator's seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image

from sharedris.data.synthetic import compose
from sharedris.data.synthetic.families import BUILDERS, FAMILIES, NO_TARGET, RELATION_CANDIDATES, hide_referent
from sharedris.data.synthetic.geometry import Placed, place

WORLDS: tuple[str, ...] = ("flat", "varied")

NOISE = 8  # per-pixel uniform noise amplitude, kept small so object colours stay recognisable


class _Gains(NamedTuple):
    stripes: float  # times the drawn stripe depth (3-12 grey levels)
    gradient: float  # times the drawn gradient (up to 25 grey levels across)
    noise: bool  # per-pixel noise on the whole image


# Background styles: today's texture, and variations built from the same draws.
_STYLE_GAINS = {
    "texture": _Gains(1.0, 1.0, True),
    "plain": _Gains(0.0, 0.0, False),
    "gradient": _Gains(0.0, 3.0, True),
    "stripes": _Gains(3.0, 0.0, True),
}
STYLES: tuple[str, ...] = tuple(_STYLE_GAINS)

_SCENE_TRIES = 200


@dataclass
class Scene:
    """A laid-out scene before rendering: enough to know the text without painting the image."""

    family: str
    objects: list[Placed]
    labels: np.ndarray  # uint8 (size, size): k + 1 on object k, 0 on the background
    targets: list[int]  # the referred objects; empty for no_target
    anchor: int | None
    texts: list[str]
    phrased_as: str  # the family whose grammar the texts follow: ``family``; for no_target, a target family


def lay_out(
    rng: np.random.Generator, family: str, size: int, phrasings: Sequence[str] = FAMILIES, world: str = "flat",
    stretch: tuple[float, float] = compose.STRETCH, relation_candidates: tuple[int, int] = RELATION_CANDIDATES,
) -> Scene:
    """Lay out a ``size`` x ``size`` scene of ``family`` in ``world`` (``WORLDS``).

    Flat world: layouts are retried until the family's builder resolves the expression. A
    ``no_target`` scene draws one of the target families in ``phrasings`` (uniformly; a family
    listed twice is drawn twice as often), lays out a scene of it (which fixes the expression, drawn
    exactly as that family draws it), then places its objects anew with the referent hidden
    (:func:`hide_referent`).

    Varied world (:mod:`~sharedris.data.synthetic.compose`): a ``no_target`` scene is a target
    scene of a family drawn from ``phrasings``, unchanged, with an expression that refers to
    nothing in it. ``stretch`` (share of scenes, widest aspect) is how often and how far its shapes
    are stretched as those of a squashed non-square picture (:func:`compose.draw_stretch`), and
    ``relation_candidates`` (fewest, most) how many objects of the named shape a constructed
    relation scene holds.
    """
    if world == "varied":
        scale = compose.draw_stretch(rng, stretch)
        if family != NO_TARGET:
            return Scene(family, *compose.target_scene(rng, family, size, scale, relation_candidates), family)
        told = phrasings[int(rng.integers(len(phrasings)))]
        objs, labels, _, _, texts = compose.target_scene(rng, told, size, scale, relation_candidates)
        return Scene(NO_TARGET, objs, labels, [], None, compose.absent_texts(rng, told, objs, texts), told)
    if family != NO_TARGET:
        return _resolved(rng, family, size)
    told = _resolved(rng, phrasings[int(rng.integers(len(phrasings)))], size)
    specs = hide_referent(told.family, [o.spec for o in told.objects], told.targets[0], told.anchor, rng)
    for _ in range(_SCENE_TRIES):
        layout = place(specs, size, rng)
        if layout is not None:
            return Scene(NO_TARGET, layout[0], layout[1], [], None, told.texts, told.family)
    raise RuntimeError(f"could not lay out a {family!r} scene at size {size}")


def _resolved(rng: np.random.Generator, family: str, size: int) -> Scene:
    """A scene of a family with a builder, laid out until its resolver accepts the layout."""
    for _ in range(_SCENE_TRIES):
        specs, resolve = BUILDERS[family](rng, size)
        specs = [specs[i] for i in rng.permutation(len(specs))]  # the target's index varies
        layout = place(specs, size, rng)
        if layout is None:
            continue
        resolved = resolve(layout[0], rng)
        if resolved is not None:
            return Scene(family, layout[0], layout[1], *resolved, family)
    raise RuntimeError(f"could not lay out a {family!r} scene at size {size}")


def render(
    labels: np.ndarray, objs: list[Placed], rng: np.random.Generator, styles: Sequence[str] = ("texture",)
) -> tuple[Image.Image, str]:
    """Paint a grey background in one of ``styles`` (drawn uniformly) and the flat-coloured objects.

    ``labels`` is the uint8 (S, S) label map of ``objs``; returns a PIL RGB S x S image and its style.
    Styles (``STYLES``): ``texture`` a soft gradient, faint stripes and per-pixel noise; ``plain``
    one flat grey, no noise anywhere; ``gradient`` a strong linear gradient; ``stripes`` strong
    stripes. The background stays low-saturation so that it can never be mistaken for an object
    colour. Every style makes the same draws, and the style is drawn after them (only when there
    is a choice), so ``texture`` scenes are the same whatever ``styles`` offers.
    Work is per channel on small arrays: whole float RGB images are big enough for malloc to hand
    them back to the OS after each sample, and the page faults then cost more than the arithmetic.
    """
    size = labels.shape[0]
    u = np.arange(size, dtype=np.float32) / size - 0.5
    gx, gy, fx, fy = rng.uniform(-1.0, 1.0, 4).astype(np.float32) * np.float32([25, 25, 6, 6])
    phase = np.float32(rng.uniform(0, 2 * np.pi))
    depth = np.float32(rng.uniform(3, 12))
    level = np.float32(rng.uniform(80, 170))
    tint = rng.integers(-8, 9, 3).tolist()  # Python ints: adding a NumPy scalar is slower
    noise = np.frombuffer(rng.bytes(3 * size * size), dtype=np.uint8)
    style = styles[int(rng.integers(len(styles)))] if len(styles) > 1 else styles[0]
    gain = _STYLE_GAINS[style]
    # Stripes sin(a(x) + b(y)) = sin a cos b + cos a sin b: two outer products of 1-D vectors are
    # much cheaper than a sine per pixel. Up to ~8 periods across, a few grey levels deep.
    a = np.float32(2 * np.pi) * fx * u + phase
    b = np.float32(2 * np.pi) * fy * u
    grey = np.outer(np.cos(b), np.sin(a))
    grey += np.outer(np.sin(b), np.cos(a))
    grey *= depth * np.float32(gain.stripes)
    grey += np.float32(gain.gradient) * (gx * u[None, :] + gy * u[:, None]) + level
    grey = grey.astype(np.int16)
    table = np.array([(0, 0, 0)] + [o.rgb for o in objs], dtype=np.int16).T
    foreground = labels > 0
    ids = labels[foreground]
    # Uniform in [0, 2 * NOISE] from random bytes by multiply-shift (far cheaper than % or integers()).
    amplitude = NOISE if gain.noise else 0
    noise = ((noise.astype(np.uint16) * (2 * amplitude + 1)) >> 8).astype(np.int16).reshape(3, size, size)
    channels = []
    for c in range(3):
        channel = grey + tint[c]
        channel[foreground] = table[c][ids]
        channel += noise[c]
        channel -= amplitude
        channels.append(Image.fromarray(np.clip(channel, 0, 255).astype(np.uint8)))
    return Image.merge("RGB", channels), style
