"""`Predictor`: numpy in, numpy out; all expressions of one image in one forward pass.

The single encoder reads image and text together, so nothing per image can be cached: the only
way to amortise work across expressions is to batch them, which is what :meth:`Predictor.predict`
does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from sharedris.data.images import ImageInput, load_image
from sharedris.data.transforms import image_to_tensor, resize_logits
from sharedris.text import Tokenizer

MAX_TEXT_CHARS = 1000  # longer input is cut before tokenizing; the model reads at most text_len tokens anyway


@dataclass
class Prediction:
    """Masks at the image's original (displayed) size.

    masks: (N, H, W) bool, one per expression.
    scores: (N,) float, the mean foreground probability inside each mask (0 for an empty mask).
    """

    masks: np.ndarray
    scores: np.ndarray


class Predictor:
    """Segment what each expression refers to in an image.

    Args:
        model: a model from :func:`sharedris.load_pretrained` (it carries ``config`` and
            ``tokenizer_file``).
        device: where to run; the model is moved there. CPU by default.
    """

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu") -> None:
        if not hasattr(model, "config") or not hasattr(model, "tokenizer_file"):
            raise ValueError("Predictor needs a model from sharedris.load_pretrained (it carries its config "
                             "and tokenizer); save a trained model with save_pretrained first")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.config = model.config
        self.tokenizer = Tokenizer(model.tokenizer_file, max_len=self.config.text_len)

    @torch.inference_mode()
    def predict(self, image: ImageInput, texts: str | Sequence[str]) -> Prediction:
        """Masks for every expression in ``texts`` (a single string is one expression).

        ``image`` may be a path, encoded bytes, a PIL image or an HxWx3 uint8 array; EXIF
        orientation is applied and any mode is converted to RGB.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError("give at least one expression")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text {i} is a {type(t).__name__} ({t!r}), expected a str")
            if not t.strip():
                # an empty expression refers to nothing; a mask for it would be noise, not an answer
                raise ValueError(f"expression {i + 1} is empty; give a phrase such as 'the man on the left'")
        img = load_image(image)
        W, H = img.size
        cfg = self.config
        x = image_to_tensor(img, cfg.image_size, cfg.mean, cfg.std).to(self.device)
        ids, pad = self.tokenizer([t[:MAX_TEXT_CHARS] for t in texts])
        n = len(texts)
        # one forward pass for all expressions: the image is shared, not copied (expand is a view)
        logits = self.model(x[None].expand(n, -1, -1, -1), ids.to(self.device), pad.to(self.device))
        probs = torch.sigmoid(resize_logits(logits[:, 0].float(), H, W))  # (N, H, W)
        masks = probs > 0.5
        area = masks.flatten(1).sum(1)
        scores = torch.where(area > 0, (probs * masks).flatten(1).sum(1) / area.clamp(min=1), 0.0)
        return Prediction(masks=masks.cpu().numpy(), scores=scores.cpu().numpy().astype(np.float32))
