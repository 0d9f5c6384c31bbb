"""Outputs for people and programs: overlays that highlight a mask, with captions; the one record
of an answer (COCO RLE mask, box) that every door writes; PNG file names; the unknown-words sentence."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DIM = 0.4  # brightness kept outside the mask, and over the whole picture for "no match"
LIGHT, DARK = (255, 255, 255), (0, 0, 0)
MAX_CAPTION_LINES = 6  # a very long expression is cut here, with an ellipsis, rather than growing the bar

if TYPE_CHECKING:
    from sharedris.predictor import Prediction


def overlay(image: Image.Image, mask: np.ndarray, caption: str, score: float | None = None,
            *, present: float | None = None, matched: bool = True) -> Image.Image:
    """``image`` with ``mask`` (HxW bool, same size) highlighted, ``caption`` on a bar above.

    The masked pixels keep their own colours; everything else is half greyed and dimmed to ``DIM``. A
    contour runs along the mask's border: a light line just outside it (on the dimmed picture)
    and, just inside it, a line of whichever of light and dark contrasts more with the masked
    pixels next to it, so the border shows whatever the object's colour.
    ``matched=False`` (the expression matches nothing) turns the whole picture grey and dim and writes
    "no match" across its middle, whatever the mask.

    The caption (prefixed with ``score`` when given, or with "no match" and the ``present``
    probability, when given, for ``matched=False``) is wrapped to the image width; the bar grows
    to as many lines as it needs, up to ``MAX_CAPTION_LINES``. The result is W x (H + bar).
    """
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    m = np.asarray(mask, dtype=bool)
    if m.shape != base.shape[:2]:
        raise ValueError(f"mask is {m.shape}, image is {base.shape[:2]}")
    shown = Image.fromarray(_highlight(base, m) if matched else _dimmed(base, colour=0.0).round().astype(np.uint8))
    font = ImageFont.load_default(size=max(12, image.width // 40))
    if not matched:
        _label_no_match(shown)
        text = f"no match (presence {present:.2f})  {caption}" if present is not None else f"no match  {caption}"
    else:
        text = caption if score is None else f"{score:.2f}  {caption}"
    lines = wrap_text(" ".join(text.split()), font, max(1, image.width - 8), MAX_CAPTION_LINES)
    line_height = int(font.size * 1.25)
    bar = line_height * len(lines) + int(font.size * 0.5)
    canvas = Image.new("RGB", (shown.width, shown.height + bar), (0, 0, 0))
    canvas.paste(shown, (0, bar))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, int(font.size * 0.25) + i * line_height), line, fill=(255, 255, 255), font=font)
    return canvas


def _highlight(base: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``base`` (HxWx3 float) dimmed outside ``m`` and contoured along its border, as uint8."""
    width = _line_width(*m.shape)
    inner = m & _grow(~m, width)
    outer = _grow(m, width) & ~m
    beside = m & _grow(inner, 1) & ~inner  # the masked pixels that the inner line runs along
    out = _dimmed(base)
    out[m] = base[m]
    out[outer] = LIGHT  # against the dimmed picture, light always contrasts
    if inner.any():
        lum = float(np.median(_luminance(base[beside if beside.any() else m])))
        # whichever WCAG contrast ratio is higher: dark's (lum + 0.05) / 0.05 or light's 1.05 / (lum + 0.05)
        out[inner] = DARK if (lum + 0.05) ** 2 > 0.05 * 1.05 else LIGHT
    return out.round().astype(np.uint8)


def _dimmed(base: np.ndarray, colour: float = 0.5) -> np.ndarray:
    """``base`` (HxWx3 float) dimmed to ``DIM`` of its brightness, keeping ``colour`` of its saturation."""
    grey = base @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    return DIM * (colour * base + (1 - colour) * grey[..., None])


def _label_no_match(shown: Image.Image) -> None:
    """"no match" in a dark box across the middle of ``shown``, in place."""
    draw = ImageDraw.Draw(shown)
    size = max(8, min(shown.height // 4, shown.width // 6))
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = draw.textbbox((shown.width / 2, shown.height / 2), "no match", font=font, anchor="mm")
    pad = max(2, size // 4)
    draw.rectangle((left - pad, top - pad, right + pad, bottom + pad), fill=DARK, outline=LIGHT,
                   width=max(1, size // 12))
    draw.text((shown.width / 2, shown.height / 2), "no match", fill=LIGHT, font=font, anchor="mm")


def _line_width(height: int, width: int) -> int:
    """Width in pixels of each contour line on a ``height`` x ``width`` picture: 1, plus 1 per 256 px."""
    return 1 + max(height, width) // 256


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """WCAG 2 relative luminance (0 black to 1 white) of 8-bit sRGB colours (..., 3)."""
    c = np.asarray(rgb, dtype=np.float64) / 255
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return linear @ np.asarray([0.2126, 0.7152, 0.0722])


def _grow(m: np.ndarray, by: int) -> np.ndarray:
    """``m`` (HxW bool) grown by ``by`` pixels in every direction (a square neighbourhood)."""
    rows = m.copy()
    for k in range(1, by + 1):
        rows[k:] |= m[:-k]
        rows[:-k] |= m[k:]
    out = rows.copy()
    for k in range(1, by + 1):
        out[:, k:] |= rows[:, :-k]
        out[:, :-k] |= rows[:, k:]
    return out


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


def mask_bbox(mask: np.ndarray) -> list[int] | None:
    """COCO ``[x, y, width, height]`` (pixels) of the smallest box holding every pixel of an HxW
    bool ``mask``; None for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def answer_record(text: str, pred: "Prediction", n: int) -> dict[str, Any]:
    """The record of answer ``n`` of ``pred`` (to ``text``), the same from the CLI's ``--json``, a
    bulk run's ``results.jsonl`` and the service (docs/getting-started.md#the-answer-record)."""
    mask = pred.masks[n]
    return {"text": text, "matched": bool(pred.matched[n]), "present": round(float(pred.present[n]), 4),
            "score": round(float(pred.scores[n]), 4), "rle": encode_rle(mask), "bbox": mask_bbox(mask),
            "unknown_words": list(pred.unknown_words[n]) if pred.unknown_words else []}


def save_pngs(image: Image.Image, pred: "Prediction", n: int, text: str, mask_path: Path,
              overlay_path: Path) -> dict[str, str | None]:
    """Write answer ``n`` of ``pred`` (to ``text``) on ``image`` as PNGs: its mask (none for "no match",
    and an earlier answer's mask file removed) and its :func:`overlay`. Returns the record's
    ``mask_png`` (None for "no match") and ``overlay_png``."""
    mask, matched = pred.masks[n], bool(pred.matched[n])
    if matched:
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
    else:
        Path(mask_path).unlink(missing_ok=True)
    overlay(image, mask, text, score=float(pred.scores[n]), present=float(pred.present[n]),
            matched=matched).save(overlay_path)
    return {"mask_png": str(mask_path) if matched else None, "overlay_png": str(overlay_path)}


def png_names(label: str, texts: Sequence[str], max_chars: int = 60) -> list[tuple[str, str]]:
    """(mask, overlay) PNG file names of each of ``texts`` asked of one image called ``label``.

    ``label`` (the image's file stem, or a manifest row's id) and each expression become
    file-name-safe: "scene", "the purple diamond" -> ``scene__the-purple-diamond_mask.png``; two
    expressions that differ only in punctuation or case, or repeats, get ``-2``, ``-3`` ...
    """
    stem = re.sub(r"[^\w.-]+", "-", str(label)).strip("-") or "image"
    slugs: list[str] = []
    for text in texts:
        base = re.sub(r"[\W_]+", "-", text.lower()).strip("-")[:max_chars].strip("-") or "expression"
        slug, k = base, 2
        while slug in slugs:
            slug, k = f"{base}-{k}", k + 1
        slugs.append(slug)
    return [(f"{stem}__{slug}_mask.png", f"{stem}__{slug}_overlay.png") for slug in slugs]
