"""Outputs for people and programs: tinted overlays with captions, COCO RLE masks, the unknown-words sentence."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TINT = (255, 64, 32)
MAX_CAPTION_LINES = 6  # a very long expression is cut here, with an ellipsis, rather than growing the bar


def overlay(image: Image.Image, mask: np.ndarray, caption: str, score: float | None = None,
            alpha: float = 0.5, *, present: float | None = None, matched: bool = True) -> Image.Image:
    """``image`` with ``mask`` (HxW bool, same size) tinted and outlined (white inside, black outside
    its border), ``caption`` on a bar above.

    The caption (prefixed with ``score`` when given) is wrapped to the image width; the bar grows
    to as many lines as it needs, up to ``MAX_CAPTION_LINES``. The result is W x (H + bar).
    ``matched=False`` (the expression matches nothing) draws the plain image, no tint, and prefixes
    the caption with "no match" and the ``present`` probability, when given, instead of the score.
    """
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    m = np.asarray(mask, dtype=bool)
    if m.shape != base.shape[:2]:
        raise ValueError(f"mask is {m.shape}, image is {base.shape[:2]}")
    if not matched:
        m = np.zeros_like(m)
    out = base.copy()
    out[m] = (1 - alpha) * base[m] + alpha * np.asarray(TINT, dtype=np.float32)
    # A white line just inside the mask's border and a black one just outside: thin masks stay
    # visible, and so do masks on objects the tint's own colour (a red shape under a red tint).
    inner = m & _grow(~m)
    outer = _grow(m) & ~m
    out[inner] = (255, 255, 255)
    out[outer] = (0, 0, 0)
    tinted = Image.fromarray(out.round().astype(np.uint8))
    font = ImageFont.load_default(size=max(12, image.width // 40))
    if not matched:
        text = f"no match (presence {present:.2f})  {caption}" if present is not None else f"no match  {caption}"
    else:
        text = caption if score is None else f"{score:.2f}  {caption}"
    lines = wrap_text(" ".join(text.split()), font, max(1, image.width - 8), MAX_CAPTION_LINES)
    line_height = int(font.size * 1.25)
    bar = line_height * len(lines) + int(font.size * 0.5)
    canvas = Image.new("RGB", (tinted.width, tinted.height + bar), (0, 0, 0))
    canvas.paste(tinted, (0, bar))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, int(font.size * 0.25) + i * line_height), line, fill=(255, 255, 255), font=font)
    return canvas


def _grow(m: np.ndarray) -> np.ndarray:
    """``m`` (HxW bool) grown by one pixel in the four directions."""
    padded = np.pad(m, 1)
    return m | padded[2:, 1:-1] | padded[:-2, 1:-1] | padded[1:-1, 2:] | padded[1:-1, :-2]


def wrap_text(text: str, font: ImageFont.FreeTypeFont, width: int, max_lines: int) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels in ``font`` (words first, then
    characters of a word too long for a line); past ``max_lines`` the last line ends in an ellipsis."""
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = ""
        for ch in word:  # a word wider than the line: break it between characters
            if current and font.getlength(current + ch) > width:
                lines.append(current)
                current = ""
            current += ch
    lines.append(current)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "…") > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last.rstrip() + "…"]
    return lines


def unknown_words_line(model: str, description: str | None, unknown_words: Sequence[Sequence[str]]) -> str | None:
    """One sentence naming the words of any expression that the model never saw in training, or None.

    ``model`` names the model (``"default"`` or a checkpoint folder, shown by its last part);
    ``description`` is what it was trained on (a phrase that reads after "trained on"), or None;
    ``unknown_words`` holds, per expression, its unknown words (``Prediction.unknown_words``).
    """
    words = list(dict.fromkeys(w for per_text in unknown_words for w in per_text))
    if not words:
        return None
    name = "the default model" if model == "default" else f"the model {Path(model).name}"
    trained = f" was trained on {description} and" if description else ""
    return f"{name}{trained} does not know: {', '.join(words)}"


def encode_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE of an HxW bool mask: ``{"size": [H, W], "counts": str}``."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
