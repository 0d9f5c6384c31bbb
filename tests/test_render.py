"""Overlays: the whole caption is readable at any image width, with the score or "no match"; the
mask's contour contrasts with the object and the background whatever their colours; "no match" looks
unlike a match; the unknown-words sentence."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from sharedris.render import MAX_CAPTION_LINES, overlay, unknown_words_line, wrap_text

FONT = ImageFont.load_default(size=12)


@pytest.mark.parametrize("width", [24, 128, 640])
def test_wrapped_lines_fit_and_keep_every_word(width):
    text = "0.87  the circle closest to the purple triangle, not the one near the supercalifragilistic box"
    lines = wrap_text(" ".join(text.split()), FONT, width, max_lines=100)
    assert all(FONT.getlength(line) <= width or len(line) == 1 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")


def test_too_long_text_is_cut_with_an_ellipsis():
    lines = wrap_text("word " * 2000, FONT, 120, max_lines=MAX_CAPTION_LINES)
    assert len(lines) == MAX_CAPTION_LINES and lines[-1].endswith("…")
    assert FONT.getlength(lines[-1]) <= 120


def test_overlay_grows_its_caption_bar_and_shows_the_score():
    img, mask = Image.new("RGB", (128, 96), (90, 90, 90)), np.zeros((96, 128), dtype=bool)
    mask[10:40, 10:40] = True
    short = overlay(img, mask, "the box")
    long = overlay(img, mask, "the circle closest to the purple triangle on the left")
    assert short.width == long.width == 128
    assert long.height > short.height > 96  # more lines, a taller bar; the image itself is whole below it
    np.testing.assert_array_equal(np.asarray(long)[long.height - 96:], np.asarray(short)[short.height - 96:])
    scored = overlay(img, mask, "the box", score=0.87)
    assert scored.size == short.size
    assert not np.array_equal(np.asarray(scored)[: short.height - 96], np.asarray(short)[: short.height - 96])


def _luminance(rgb) -> np.ndarray:
    """WCAG 2 relative luminance of 8-bit sRGB colours (..., 3)."""
    c = np.asarray(rgb, dtype=np.float64) / 255
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return linear @ np.asarray([0.2126, 0.7152, 0.0722])


def _contrast(a, b) -> np.ndarray:
    """WCAG 2 contrast ratio (1 to 21) between 8-bit sRGB colours."""
    la, lb = _luminance(a), _luminance(b)
    return (np.maximum(la, lb) + 0.05) / (np.minimum(la, lb) + 0.05)


def _touching(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pixels of ``a`` with a 4-neighbour in ``b`` (HxW bools)."""
    p = np.pad(b, 1)
    return a & (p[2:, 1:-1] | p[:-2, 1:-1] | p[1:-1, 2:] | p[1:-1, :-2])


def _two_shapes(colour, background, size=(120, 90)) -> tuple[Image.Image, np.ndarray]:
    """A disc and a square of ``colour`` on ``background``, and the mask of both ("all the ... shapes")."""
    img = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(img)
    draw.ellipse((20, 20, 70, 70), fill=colour)
    draw.rectangle((82, 25, 108, 51), fill=colour)
    return img, (np.asarray(img) == colour).all(-1)


OBJECTS = {"red": (220, 30, 30), "blue": (30, 60, 220), "yellow": (240, 220, 40), "grey": (128, 128, 128)}
BACKGROUNDS = {"light": (240, 240, 235), "mid": (100, 100, 100), "dark": (20, 22, 28)}


@pytest.mark.parametrize("background", BACKGROUNDS)
@pytest.mark.parametrize("colour", OBJECTS)
def test_the_contour_contrasts_with_the_object_and_with_the_background(colour, background):
    """The rendered picture splits into three parts: the object (pixels that keep the object's own
    colour), the background (pixels of the colour the overlay gives the far corner) and the contour
    (everything else). The contour must separate the two (no object pixel next to a background
    pixel), and every contour pixel next to the object must have a WCAG contrast ratio of at least
    3:1 with the object's colour, every one next to the background at least 3:1 with the
    background as shown."""
    img, mask = _two_shapes(OBJECTS[colour], BACKGROUNDS[background])
    out = np.asarray(overlay(img, mask, "all the shapes", score=0.9))[-img.height:]
    obj = mask & (out == OBJECTS[colour]).all(-1)
    shown_background = out[0, 0]
    back = ~mask & (out == shown_background).all(-1)
    contour = ~obj & ~back
    assert obj.sum() > 0.7 * mask.sum() and back.sum() > 0.7 * (~mask).sum()  # both still mostly visible
    assert not _touching(obj, back).any()  # the contour runs all around
    beside_object, beside_background = _touching(contour, obj), _touching(contour, back)
    assert beside_object.any() and beside_background.any()
    assert _contrast(out[beside_object], OBJECTS[colour]).min() >= 3
    assert _contrast(out[beside_background], shown_background).min() >= 3


def test_the_object_stands_out_from_the_rest_of_the_picture():
    img, mask = _two_shapes(OBJECTS["blue"], BACKGROUNDS["light"])
    draw = ImageDraw.Draw(img)
    draw.polygon([(60, 75), (75, 60), (90, 75), (75, 89)], fill=(150, 60, 200))  # a purple diamond, not masked
    out = np.asarray(overlay(img, mask, "the blue shapes", score=0.9))[-img.height:]
    original = np.asarray(img)
    purple = (original == (150, 60, 200)).all(-1)
    assert _luminance(out[purple]).max() < 0.5 * _luminance(original[purple]).min()  # dimmed ...
    spread = out[purple].max(-1).astype(int) - out[purple].min(-1)
    assert spread.max() < 0.75 * (200 - 60)  # ... and greyer, so it cannot pass for the object


def test_no_match_is_grey_dim_labelled_and_unlike_a_match():
    img, mask = _two_shapes(OBJECTS["red"], BACKGROUNDS["light"])
    h = img.height
    matched = np.asarray(overlay(img, mask, "the box", score=0.87))
    no_match = np.asarray(overlay(img, mask, "the box", score=0.87, present=0.03, matched=False))
    # whatever the mask: the same picture as with an empty one
    np.testing.assert_array_equal(no_match, np.asarray(overlay(img, np.zeros_like(mask), "the box", score=0.87,
                                                               present=0.03, matched=False)))
    picture = no_match[-h:].astype(int)
    assert (picture.max(-1) - picture.min(-1) <= 1).all()  # grey: no colour left anywhere
    light = _luminance(picture) > 0.8
    assert light.any() and not light[: h // 4].any() and not light[-(h // 4):].any()  # a label in the middle
    rows, cols = np.nonzero(light)
    outside = np.ones_like(light)
    outside[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1] = False
    assert (_luminance(picture[outside]) < 0.25).all()  # everything around the label dim
    # the object's pixels: colourful in the match, grey and dim here
    assert (np.abs(matched[-h:].astype(int) - picture).max(-1)[mask] > 64).mean() > 0.9
    # "no match" and the presence, not the score, above the picture
    assert not np.array_equal(no_match[: no_match.shape[0] - h], matched[: matched.shape[0] - h])
    # the plain "no match" caption without a presence differs from the one with it
    assert not np.array_equal(np.asarray(overlay(img, mask, "the box", matched=False)), no_match)
    # a long caption still wraps: a taller bar, the picture whole below it
    long = overlay(img, mask, "the circle closest to the purple triangle on the left", present=0.4, matched=False)
    assert long.height > no_match.shape[0] and np.array_equal(np.asarray(long)[-h:], no_match[-h:])


def test_unknown_words_line():
    assert unknown_words_line("default", "synthetic shape scenes", [["cat"], [], ["woman", "cat"]]) == (
        "the default model was trained on synthetic shape scenes and does not know: cat, woman")
    assert unknown_words_line("/models/run7/best", None, [["zebra"]]) == "the model best does not know: zebra"
    assert unknown_words_line("default", "synthetic shape scenes", [[], []]) is None
