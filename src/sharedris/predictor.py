"""Preprocess -> forward (through :class:`~sharedris.runtime.ModelRunner`) -> postprocess: `Predictor`.

``Predictor.predict`` is numpy in, numpy out, for one image and all its expressions. The pieces
are public so that batch evaluation, the service, bulk prediction and benchmarks run the same code:
:class:`ImagePreprocessor` (picklable, for DataLoader workers), :meth:`Predictor.prepare_texts`,
:meth:`Predictor.forward` (batched tensors in, :class:`SegmenterOutput` out) and
:meth:`Predictor.postprocess` (masks, scores and the "no match" decision).

The single encoder reads image and text together, so nothing per image can be cached: the only
way to amortise work across expressions is to batch them, which is what :meth:`Predictor.predict`
does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
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
from sharedris.runtime import (
    DEFAULT_DEVICE,
    DEFAULT_PRECISION,
    DEFAULT_PRESENCE_THRESHOLD,
    DEFAULT_RUNTIME,
    ModelRunner,
)
from sharedris.text import Tokenizer, validate_texts


@dataclass
class Prediction:
    """Masks at the image's original (displayed) size, one per expression, and how sure the model is.

    masks: (N, H, W) bool; empty exactly where ``matched`` is False.
    scores: (N,) float32, the model's predicted IoU of each mask with what the expression refers
        to, in [0, 1] (a model without an IoU head: the mean foreground probability inside the
        mask); 0.0 for "no match", since there is no mask to be sure of.
    present: (N,) float32, the probability that something in the image matches the expression
        (1 for a model without a presence head).
    matched: (N,) bool, True exactly when the answer is a mask: ``present >= presence_threshold``
        and the thresholded mask has at least one pixel at the image's size. False means "no
        match": an empty mask and a score of 0.0, whatever ``present`` says.
    unknown_words: per expression, the words the model never saw in training (always empty for a
        model with an open vocabulary).
    probs: (N, H, W) float32 foreground probabilities, only when asked for (``return_probs``); not
        emptied for "no match".
    """

    masks: np.ndarray
    scores: np.ndarray
    present: np.ndarray
    matched: np.ndarray
    unknown_words: list[list[str]] = field(default_factory=list)
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


class Predictor:
    """Segment what each expression refers to in an image.

    Args:
        model: a Shared-RIS model (from :func:`sharedris.load_pretrained` or
            :func:`sharedris.build_model`); its ``config`` gives the preprocessing.
        tokenizer: a :class:`~sharedris.text.Tokenizer` or a SentencePiece file; default: the
            model's own (``model.tokenizer_file``), else the bundled one named by its config.
        device: where to run (CPU by default). The caller's model is never modified: see
            :class:`~sharedris.runtime.ModelRunner`, which runs it.
        precision: ``fp32``, ``bf16``, ``int8`` or ``auto`` (see :mod:`sharedris.precision`).
        presence_threshold: an expression whose presence probability is below this matches
            nothing ("no match"); so does one whose mask has no pixel (see :class:`Prediction`).
        runtime: ``torch``, or ``openvino`` (CPU, fp32 or bf16; the faster bf16 path on CPUs with
            AVX-512-BF16 but no AMX; see :mod:`sharedris.runtime`).
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer | str | Path | None = None,
                 device: torch.device | str = DEFAULT_DEVICE, precision: str = DEFAULT_PRECISION,
                 presence_threshold: float = DEFAULT_PRESENCE_THRESHOLD, runtime: str = DEFAULT_RUNTIME) -> None:
        config = getattr(model, "config", None)
        if not isinstance(config, ModelConfig):
            raise ValueError("Predictor needs a Shared-RIS model (from sharedris.build_model or "
                             "sharedris.load_pretrained), which carries its config")
        if not 0.0 <= presence_threshold <= 1.0:
            raise ValueError(f"presence_threshold must be in [0, 1], got {presence_threshold}")
        self.runner = ModelRunner(model, device, precision, runtime)
        self.device, self.precision, self.runtime = self.runner.device, self.runner.precision, self.runner.runtime
        self.config = config
        self.presence_threshold = presence_threshold
        self.vocabulary: frozenset[str] | None = getattr(model, "vocabulary", None)
        self.description: str | None = getattr(model, "description", None)
        if not isinstance(tokenizer, Tokenizer):
            tokenizer = Tokenizer(resolve_tokenizer(config, tokenizer or getattr(model, "tokenizer_file", None)),
                                  max_len=config.text_len)
        self.tokenizer = tokenizer
        self.preprocess_image = ImagePreprocessor.from_config(config)

    def prepare_texts(self, texts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """Validate and tokenize: ids (N, L) long, padding mask (N, L) bool (True = padding)."""
        return self.tokenizer(validate_texts(texts))

    def forward(self, images: Tensor, ids: Tensor, pad: Tensor) -> SegmenterOutput:
        """The model on a batch of pairs: images (B, 3, S, S), ids (B, L), pad (B, L).

        Runs on the predictor's device at its precision; the returned mask logits are float32.
        """
        return self.runner(images, ids, pad)

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` outside the model's training vocabulary (none for an open vocabulary)."""
        if self.vocabulary is None:
            return []
        words = re.findall(r"[^\W\d_]+", text.lower())
        return sorted({w for w in words if w not in self.vocabulary}, key=words.index)

    def postprocess(self, output: SegmenterOutput, height: int, width: int, return_probs: bool = False,
                    texts: Sequence[str] = ()) -> Prediction:
        """Masks of the pairs in ``output`` (all of one image) at that image's ``height`` x ``width``.

        ``texts`` (the expressions, in order) fill ``unknown_words``. This is where "no match" is
        decided, for every caller: presence below the threshold or no mask pixel at this size.
        """
        logits = resize_logits(output.mask_logits[:, 0], height, width)  # (N, H, W)
        # full-size probabilities only when asked for, or for the score of a model without an IoU head
        probs = torch.sigmoid(logits) if return_probs or output.iou_pred is None else None
        masks = logits > 0
        present = (torch.sigmoid(output.presence_logits) if output.presence_logits is not None
                   else torch.ones(len(logits), device=logits.device))
        matched = (present >= self.presence_threshold) & masks.flatten(1).any(1)  # "no match": an empty mask
        masks &= matched[:, None, None]
        if output.iou_pred is not None:
            scores = output.iou_pred.clamp(0.0, 1.0)
        else:  # the mean foreground probability inside the mask
            scores = (probs * masks).flatten(1).sum(1) / masks.flatten(1).sum(1).clamp(min=1)
        scores = torch.where(matched, scores, 0.0)  # no mask, no confidence in one
        return Prediction(masks=masks.cpu().numpy(), scores=scores.cpu().numpy().astype(np.float32),
                          present=present.cpu().numpy().astype(np.float32), matched=matched.cpu().numpy(),
                          unknown_words=[self.unknown_words(t) for t in texts],
                          probs=probs.cpu().numpy() if return_probs else None)

    def predict(self, image: ImageInput, texts: str | Sequence[str], return_probs: bool = False) -> Prediction:
        """Masks for every expression in ``texts`` (a single string is one expression).

        ``image`` may be a path, encoded bytes, a PIL image or an HxWx3 uint8 array; EXIF
        orientation is applied and any mode is converted to RGB. All expressions go through the
        model in one batch; the image is shared, not copied.
        """
        texts = validate_texts(texts)
        ids, pad = self.tokenizer(texts)
        x, (height, width) = self.preprocess_image(image)
        output = self.forward(x[None].expand(len(ids), -1, -1, -1), ids, pad)
        return self.postprocess(output, height, width, return_probs, texts)
