"""The one inference path: preprocess -> forward -> postprocess, and `Predictor` on top of it.

``Predictor.predict`` is numpy in, numpy out, for one image and all its expressions. The pieces
are public so that batch evaluation, the service, bulk prediction and benchmarks run the same code:
:class:`ImagePreprocessor` (picklable, for DataLoader workers), :meth:`Predictor.prepare_texts`,
:meth:`Predictor.forward` (batched tensors in, :class:`SegmenterOutput` out) and
:func:`masks_from_logits` / :meth:`Predictor.postprocess`.

The single encoder reads image and text together, so nothing per image can be cached: the only
way to amortise work across expressions is to batch them, which is what :meth:`Predictor.predict`
does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from sharedris.data.images import ImageInput, load_image
from sharedris.data.transforms import image_to_tensor, resize_logits
from sharedris.modeling.config import ModelConfig
from sharedris.modeling.pretrained import resolve_tokenizer
from sharedris.modeling.segmenter import SegmenterOutput
from sharedris.precision import autocast_context, prepare_model, resolve_precision
from sharedris.text import Tokenizer, validate_texts


@dataclass
class Prediction:
    """Masks at the image's original (displayed) size.

    masks: (N, H, W) bool, one per expression.
    scores: (N,) float, the mean foreground probability inside each mask (0 for an empty mask).
    probs: (N, H, W) float32 foreground probabilities, only when asked for (``return_probs``).
    """

    masks: np.ndarray
    scores: np.ndarray
    probs: np.ndarray | None = None


@dataclass(frozen=True)
class ImagePreprocessor:
    """Any image input -> ``(tensor (3, S, S) normalized, (H, W) displayed size)``.

    Picklable, so DataLoader workers can decode and resize while the model runs. User images get
    their EXIF orientation applied (see :func:`sharedris.data.images.load_image`).
    """

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "ImagePreprocessor":
        return cls(cfg.image_size, tuple(cfg.mean), tuple(cfg.std))

    def __call__(self, image: ImageInput) -> tuple[Tensor, tuple[int, int]]:
        img = load_image(image)
        return image_to_tensor(img, self.image_size, self.mean, self.std), (img.height, img.width)


def masks_from_logits(mask_logits: Tensor, height: int, width: int) -> Tensor:
    """(N, 1, h, w) mask logits -> (N, H, W) bool masks at the image size (bilinear logits, > 0)."""
    return resize_logits(mask_logits[:, 0], height, width) > 0


class Predictor:
    """Segment what each expression refers to in an image.

    Args:
        model: a Shared-RIS model (from :func:`sharedris.load_pretrained` or
            :func:`sharedris.build_model`); its ``config`` gives the preprocessing.
        tokenizer: a :class:`~sharedris.text.Tokenizer` or a SentencePiece file; default: the
            model's own (``model.tokenizer_file``), else the bundled one named by its config.
        device: where to run; the model is moved there. CPU by default.
        precision: ``fp32``, ``bf16``, ``int8`` or ``auto`` (see :mod:`sharedris.precision`).
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer | str | Path | None = None,
                 device: torch.device | str = "cpu", precision: str = "fp32") -> None:
        config = getattr(model, "config", None)
        if not isinstance(config, ModelConfig):
            raise ValueError("Predictor needs a Shared-RIS model (from sharedris.build_model or "
                             "sharedris.load_pretrained), which carries its config")
        self.device = torch.device(device)
        self.config = config
        if not isinstance(tokenizer, Tokenizer):
            tokenizer = Tokenizer(resolve_tokenizer(config, tokenizer or getattr(model, "tokenizer_file", None)),
                                  max_len=config.text_len)
        self.tokenizer = tokenizer
        self.precision = resolve_precision(precision, self.device)  # the concrete one: fp32, bf16 or int8
        self.model, self.amp_dtype = prepare_model(model.to(self.device).eval(), self.precision, self.device)
        self.preprocess_image = ImagePreprocessor.from_config(config)

    def prepare_texts(self, texts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """Validate and tokenize: ids (N, L) long, padding mask (N, L) bool (True = padding)."""
        return self.tokenizer(validate_texts(texts))

    @torch.inference_mode()
    def forward(self, images: Tensor, ids: Tensor, pad: Tensor) -> SegmenterOutput:
        """The model on a batch of pairs: images (B, 3, S, S), ids (B, L), pad (B, L).

        Runs on the predictor's device at its precision; the returned mask logits are float32.
        """
        with autocast_context(self.device, self.amp_dtype):
            out = self.model(images.to(self.device), ids.to(self.device), pad.to(self.device))
        return SegmenterOutput(*(t.float() for t in out))

    def postprocess(self, output: SegmenterOutput, height: int, width: int,
                    return_probs: bool = False) -> Prediction:
        """Masks of the pairs in ``output`` (all of one image) at that image's ``height`` x ``width``."""
        logits = resize_logits(output.mask_logits[:, 0], height, width)  # (N, H, W)
        masks = logits > 0
        probs = torch.sigmoid(logits)
        area = masks.flatten(1).sum(1)
        scores = torch.where(area > 0, (probs * masks).flatten(1).sum(1) / area.clamp(min=1), 0.0)
        return Prediction(masks=masks.cpu().numpy(), scores=scores.cpu().numpy().astype(np.float32),
                          probs=probs.cpu().numpy() if return_probs else None)

    def predict(self, image: ImageInput, texts: str | Sequence[str], return_probs: bool = False) -> Prediction:
        """Masks for every expression in ``texts`` (a single string is one expression).

        ``image`` may be a path, encoded bytes, a PIL image or an HxWx3 uint8 array; EXIF
        orientation is applied and any mode is converted to RGB. All expressions go through the
        model in one batch; the image is shared, not copied.
        """
        ids, pad = self.prepare_texts(texts)
        x, (height, width) = self.preprocess_image(image)
        output = self.forward(x[None].expand(len(ids), -1, -1, -1), ids, pad)
        return self.postprocess(output, height, width, return_probs)
