"""Overlays: the whole caption is readable at any image width, with the score or "no match"; the
unknown-words sentence."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFont

from sharedris.render import TINT, MAX_CAPTION_LINES, overlay, unknown_words_line, wrap_text

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


def test_overlay_outlines_the_mask_so_that_it_shows_on_any_colour():
    img = np.full((96, 128, 3), 90, dtype=np.uint8)
    img[10:40, 10:40] = TINT  # an object of the tint's own colour
    mask = np.zeros((96, 128), dtype=bool)
    mask[10:40, 10:40] = True
    out = np.asarray(overlay(Image.fromarray(img), mask, "the box"))[-96:]
    ring_in = mask.copy()
    ring_in[11:39, 11:39] = False  # the mask's border pixels
    assert (out[ring_in] == 255).all()  # white just inside
    ring_out = np.zeros_like(mask)
    ring_out[9:41, 9:41] = True
    ring_out[10:40, 10:40] = False
    ring_out[[9, 9, 40, 40], [9, 40, 9, 40]] = False  # the corners touch the mask only diagonally
    assert (out[ring_out] == 0).all()  # black just outside
    untouched = ~(ring_out | mask)
    np.testing.assert_array_equal(out[untouched], img[untouched])  # nothing else changes


def test_no_match_overlay_draws_no_tint_and_says_so():
    img, mask = Image.new("RGB", (128, 96), (90, 90, 90)), np.zeros((96, 128), dtype=bool)
    mask[10:40, 10:40] = True
    matched = overlay(img, mask, "the box", score=0.87)
    no_match = overlay(img, mask, "the box", score=0.87, present=0.03, matched=False)
    np.testing.assert_array_equal(np.asarray(no_match)[-96:], np.asarray(img))  # the plain image, mask or not
    assert not np.array_equal(np.asarray(matched)[-96:], np.asarray(img))
    # "no match" and the presence, not the score
    assert not np.array_equal(np.asarray(no_match)[: no_match.height - 96], np.asarray(matched)[: matched.height - 96])
    # the plain "no match" caption without a presence differs from the one with it
    assert not np.array_equal(np.asarray(overlay(img, mask, "the box", matched=False)), np.asarray(no_match))
    # a long caption still wraps: a taller bar, the image whole below it
    long = overlay(img, mask, "the circle closest to the purple triangle on the left", present=0.4, matched=False)
    assert long.height > no_match.height and np.array_equal(np.asarray(long)[-96:], np.asarray(img))


def test_unknown_words_line():
    assert unknown_words_line("default", "synthetic shape scenes", [["cat"], [], ["woman", "cat"]]) == (
        "the default model was trained on synthetic shape scenes and does not know: cat, woman")
    assert unknown_words_line("/models/run7/best", None, [["zebra"]]) == "the model best does not know: zebra"
    assert unknown_words_line("default", "synthetic shape scenes", [[], []]) is None
