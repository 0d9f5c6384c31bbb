"""Painting the varied world: many backgrounds, shades, edges and camera-like damage.

A flat-world picture (:func:`sharedris.data.synthetic.scene.render`) is one style of grey
background and flat objects with hard edges; users draw otherwise. :func:`paint` draws per scene:

- a background (``BACKGROUNDS``): ``plain`` mid grey, ``light`` near white, ``dark`` near black,
  ``tinted`` a pale or dark low-saturation colour (pastel), ``gradient`` between two such
  colours, ``texture`` soft stripes on a gradient, ``noisy`` grey under strong per-pixel noise;
- per object, a lighter or darker shade of its colour (up to ``LIGHTEN`` of the way to white or
  ``DARKEN`` to black), sometimes a linear shading across it and an outline in a darker, black or white tone;
- per scene, hard or anti-aliased edges (4x supersampled coverage), and then, each by chance,
  blur, sensor noise, a low-resolution round trip (a small picture scaled up) and JPEG artefacts.

Masks stay the label map's hard pixels: anti-aliasing and blur only soften what is drawn.
"""

from __future__ import annotations

import colorsys
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from sharedris.data.synthetic.geometry import Placed

BACKGROUNDS: tuple[str, ...] = ("plain", "light", "dark", "tinted", "gradient", "texture", "noisy")
LIGHTEN, DARKEN = 0.3, 0.25  # furthest an object's colour moves towards white, or black
_SUPERSAMPLE = 4


def paint(labels: np.ndarray, objs: list[Placed], rng: np.random.Generator) -> tuple[Image.Image, str]:
    """The RGB picture of a laid-out scene (``labels``: uint8 (S, S), ``k + 1`` on object ``k``) and its background."""
    size = labels.shape[0]
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    canvas = _background(rng, background, size)  # float32 (S, S, 3)
    antialias = rng.random() < 0.4
    for k, o in enumerate(objs):
        _paint_object(canvas, labels, k + 1, o, rng, antialias)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    return _damage(image, rng), background


def _low_saturation(rng: np.random.Generator, value: tuple[float, float]) -> np.ndarray:
    """An RGB colour of saturation <= 0.3 (so never an object colour) and brightness in ``value``."""
    hue, sat, val = rng.random(), rng.uniform(0.0, 0.3), rng.uniform(*value)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32) * 255


def _background(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    u = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    if kind == "plain":
        return np.full((size, size, 3), rng.uniform(80, 170), dtype=np.float32)
    if kind == "light":
        return np.full((size, size, 3), rng.uniform(215, 250), dtype=np.float32)
    if kind == "dark":
        return np.full((size, size, 3), rng.uniform(10, 60), dtype=np.float32)
    if kind == "tinted":
        bright = rng.integers(2)
        tone = _low_saturation(rng, (0.8, 1.0) if bright else (0.15, 0.35))
        return np.broadcast_to(tone, (size, size, 3)).copy()
    if kind == "noisy":
        base = np.full((size, size, 3), rng.uniform(60, 190), dtype=np.float32)
        return base + rng.normal(0, rng.uniform(12, 28), (size, size, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * u[None, :] + np.sin(angle) * u[:, None] + 0.5  # (S, S) in about [0, 1]
    start, end = _low_saturation(rng, (0.1, 1.0)), _low_saturation(rng, (0.1, 1.0))
    canvas = start + (end - start) * ramp[..., None]
    if kind == "texture":
        fx, fy = rng.uniform(-6, 6, 2)
        stripes = np.sin(2 * np.pi * (fx * u[None, :] + fy * u[:, None]) + rng.uniform(0, 2 * np.pi))
        canvas += (rng.uniform(4, 15) * stripes)[..., None]
    return canvas.astype(np.float32)


def _shade(rng: np.random.Generator, rgb: tuple[int, int, int]) -> np.ndarray:
    """``rgb`` moved part of the way towards white or black."""
    colour = np.array(rgb, dtype=np.float32)
    if rng.random() >= 0.6:
        return colour
    if rng.integers(2):
        return colour + (255 - colour) * rng.uniform(0, LIGHTEN)
    return colour * (1 - rng.uniform(0, DARKEN))


def _paint_object(canvas: np.ndarray, labels: np.ndarray, label: int, o: Placed,
                  rng: np.random.Generator, antialias: bool) -> None:
    size = labels.shape[0]
    x, y, w, h = o.bbox
    x0, y0, x1, y1 = max(x - 1, 0), max(y - 1, 0), min(x + w + 1, size), min(y + h + 1, size)
    inside = labels[y0:y1, x0:x1] == label
    colour = _shade(rng, o.rgb)
    fill = np.broadcast_to(colour, (y1 - y0, x1 - x0, 3)).astype(np.float32)
    if rng.random() < 0.3:  # shading: brighter on one side
        gx, gy = rng.uniform(-0.5, 0.5, 2)
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        factor = 1 + (gx * (xs - o.centre[0]) + gy * (ys - o.centre[1])) / max(w, h)
        fill = fill * factor[..., None]
    if rng.random() < 0.3:  # an outline inside the object's own pixels
        tone = (colour * 0.4, np.zeros(3, np.float32), np.full(3, 255, np.float32))[int(rng.integers(3))]
        line = Image.new("1", (x1 - x0, y1 - y0))
        points = (o.polygon - (x0, y0)).tolist()
        ImageDraw.Draw(line).line(points + points[:1], fill=1, width=int(rng.integers(1, 4)))
        ring = np.asarray(line) & inside
        fill = np.where(ring[..., None], tone, fill)
    alpha = _coverage(o.polygon, x0, y0, x1, y1) if antialias else inside.astype(np.float32)
    region = canvas[y0:y1, x0:x1]
    region += alpha[..., None] * (fill - region)


def _coverage(polygon: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """Fraction of each pixel of the crop the polygon covers, from a 4x supersampled drawing."""
    k = _SUPERSAMPLE
    big = Image.new("L", ((x1 - x0) * k, (y1 - y0) * k))
    # A pixel's centre at (i + 0.5): the hard raster fills pixel i when its centre is inside.
    ImageDraw.Draw(big).polygon(((polygon - (x0, y0)) * k + (k - 1) / 2).ravel().tolist(), fill=255)
    return np.asarray(big.resize((x1 - x0, y1 - y0), Image.Resampling.BOX), dtype=np.float32) / 255


def _damage(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Blur, sensor noise, a low-resolution round trip and JPEG, each by chance, in that order."""
    size = image.width
    if rng.random() < 0.2:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.2)))
    if rng.random() < 0.25:
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(3, 12), (size, size, 3))
        image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    if rng.random() < 0.2:
        small = max(int(size * rng.uniform(0.35, 0.8)), 16)
        image = image.resize((small, small), Image.Resampling.BILINEAR).resize((size, size), Image.Resampling.BILINEAR)
    if rng.random() < 0.3:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(20, 91)))
        image = Image.open(buffer).convert("RGB")
    return image
