"""Outputs for people and programs: tinted overlays with captions, COCO RLE masks."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TINT = (255, 64, 32)


def overlay(image: Image.Image, mask: np.ndarray, caption: str, alpha: float = 0.5) -> Image.Image:
    """``image`` with ``mask`` (HxW bool, same size) tinted and outlined, ``caption`` on a bar above."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    m = np.asarray(mask, dtype=bool)
    if m.shape != base.shape[:2]:
        raise ValueError(f"mask is {m.shape}, image is {base.shape[:2]}")
    out = base.copy()
    out[m] = (1 - alpha) * base[m] + alpha * np.asarray(TINT, dtype=np.float32)
    # 1-pixel outline where the mask meets the background, so thin masks stay visible
    edge = m & ~(np.pad(m, 1)[2:, 1:-1] & np.pad(m, 1)[:-2, 1:-1] & np.pad(m, 1)[1:-1, 2:] & np.pad(m, 1)[1:-1, :-2])
    out[edge] = TINT
    tinted = Image.fromarray(out.round().astype(np.uint8))
    font = ImageFont.load_default(size=max(12, image.width // 40))
    text = caption if len(caption) <= 120 else caption[:117] + "..."
    bar = int(font.size * 1.6)
    canvas = Image.new("RGB", (tinted.width, tinted.height + bar), (0, 0, 0))
    canvas.paste(tinted, (0, bar))
    ImageDraw.Draw(canvas).text((4, (bar - font.size) // 2), text, fill=(255, 255, 255), font=font)
    return canvas


def encode_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE of an HxW bool mask: ``{"size": [H, W], "counts": str}``."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
