"""A randomly initialised, very small Shared-RIS checkpoint folder and test images, for fast tests."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image
from torch import nn

from sharedris.modeling.pretrained import save_pretrained
from sharedris.modeling.registry import build_model, model_config

TINY_MODEL = {
    "encoder": {"depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_dim": 64},
    "image_size": 64,
    "taps": (1, 1, 2, 2),
    "fpn": {"width": 16, "num_heads": 1, "fine_width": 8},
    "decoder": {"num_heads": 1, "depth": 1},
}


def tiny_model(seed: int = 0, presence_bias: float | None = None, mask_bias: float | None = None,
               **decoder) -> nn.Module:
    """A randomly initialised tiny model; ``decoder`` overrides fields of its decoder config.

    ``presence_bias`` replaces the bias of the presence head's last layer: a large positive value
    makes every expression present, a large negative one none. ``mask_bias`` replaces the bias
    added to every mask logit: a large positive value fills every mask, a large negative one
    empties it.
    """
    cfg = model_config("sharedris_tiny", **{**TINY_MODEL, "decoder": {**TINY_MODEL["decoder"], **decoder}})
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        if presence_bias is not None:
            model.decoder.presence_mlp[-1].bias.fill_(presence_bias)
        if mask_bias is not None:
            model.decoder.logit_bias.fill_(mask_bias)
    return model


def save_tiny_model(folder: Path, seed: int = 0, presence_bias: float | None = None,
                    vocabulary: Iterable[str] | None = None, description: str | None = None,
                    mask_bias: float | None = None) -> Path:
    """Write a tiny checkpoint folder (config.json, model.safetensors, tiny.spm) and return it.

    ``presence_bias`` and ``mask_bias`` as for :func:`tiny_model`. ``vocabulary`` (and
    ``description``) add vocabulary.json, so that other words are unknown to the model.
    """
    model = tiny_model(seed, presence_bias, mask_bias)
    if vocabulary is not None:
        model.vocabulary, model.description = frozenset(vocabulary), description
    return save_pretrained(model, folder)


def scene(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image with a few coloured rectangles on a noisy background."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
    for _ in range(3):
        x0, y0 = rng.integers(0, max(width // 2, 1)), rng.integers(0, max(height // 2, 1))
        x1, y1 = x0 + max(width // 3, 1), y0 + max(height // 3, 1)
        arr[y0:y1, x0:x1] = rng.integers(80, 256, size=3, dtype=np.uint8)
    return Image.fromarray(arr)


def encode(img: Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_args)
    return buf.getvalue()
