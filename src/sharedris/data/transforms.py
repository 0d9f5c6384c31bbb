"""The one preprocessing path used by training, evaluation, the predictor, the CLI and the server.

Resize to the model's square size (no aspect keep, no flips: expressions say left/right), scale to
[0, 1], normalize with the model's mean/std.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def image_to_tensor(image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """PIL RGB image -> normalized float tensor (3, size, size)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x - m) / s


def mask_to_tensor(mask: np.ndarray, size: int) -> Tensor:
    """Boolean HxW mask -> float tensor (1, size, size) in {0, 1}, resized with nearest neighbour."""
    img = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(img) > 127).float()[None]


def resize_logits(logits: Tensor, height: int, width: int) -> Tensor:
    """Logits (..., h, w) bilinearly resized to (..., height, width); threshold at 0 for the mask."""
    if logits.shape[-2:] == (height, width):
        return logits
    lead = logits.shape[:-2]
    x = logits.reshape(-1, 1, *logits.shape[-2:]).float()
    x = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    return x.reshape(*lead, height, width)
