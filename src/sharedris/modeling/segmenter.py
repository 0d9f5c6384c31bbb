"""Shared-RIS: BEiT-3 encoder -> Shared FPN -> Shared Mask Decoder, one mask per (image, text) pair."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from sharedris.modeling.beit3 import BEiT3
from sharedris.modeling.config import ModelConfig
from sharedris.modeling.decoder import MaskDecoder, corrected_soft_iou
from sharedris.modeling.fpn import SharedFPN


class SegmenterOutput(NamedTuple):
    """What :class:`SharedRIS` returns, in training and evaluation alike (a tuple, so it exports).

    mask_logits: (B, 1, H, W) mask logits at the input size; logit > 0 (probability > 0.5) is the mask.
    presence_logits: (B,) logit that something in the image matches the expression; None without
        a presence head.
    iou_pred: (B,) predicted IoU of the thresholded mask with the target (trained towards [0, 1]);
        None without an IoU head.
    anchor_logits: (B, 1, H, W) mask logits of a relation's anchor, at the input size, with
        ``decoder.anchor_point`` and in training mode only (the training loss reads them); None
        otherwise. Exported graphs and runtimes return the other fields (:data:`INFERENCE_FIELDS`).
    """

    mask_logits: Tensor
    presence_logits: Tensor | None = None
    iou_pred: Tensor | None = None
    anchor_logits: Tensor | None = None

    def rows(self, start: int, stop: int) -> "SegmenterOutput":
        """The pairs ``start:stop`` of the batch (an output the model lacks stays None)."""
        return SegmenterOutput(*(None if t is None else t[start:stop] for t in self))


INFERENCE_FIELDS = ("mask_logits", "presence_logits", "iou_pred")  # what a model in evaluation mode can return


class SharedRIS(nn.Module):
    """Referring image segmentation with one encoder for image and text.

    Args:
        encoder: BEiT-3 encoder; kept under the attribute name ``encoder`` so that trainers can
            tell pretrained parameters (``encoder.*``) from new ones.
        fpn: Shared FPN built for ``encoder``'s width.
        decoder: mask decoder of the FPN's width.
        config: the :class:`ModelConfig` the parts were built from (``config.taps``: the four
            encoder blocks whose hidden states feed the FPN). It stays on the model as ``config``,
            with the preprocessing its weights expect.

    ``tokenizer_file`` is the SentencePiece file that came with loaded weights (None for a model
    built from a config: the predictor then uses the bundled tokenizer of ``config.tokenizer``).
    ``vocabulary`` (frozenset of lower-case words, or None for an open vocabulary) and
    ``description`` (what it was trained on, or None) come from the training data and travel
    with saved weights.

    Encoder parts that this model never runs (the final norm, which the taps precede, and any block
    after the deepest tap) are frozen: they stay in the state dict for checkpoint compatibility, but
    trainable parameters without gradients would break DDP without ``find_unused_parameters``.
    """

    def __init__(self, encoder: BEiT3, fpn: SharedFPN, decoder: MaskDecoder, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tokenizer_file: Path | None = None
        self.vocabulary: frozenset[str] | None = None
        self.description: str | None = None
        self.encoder = encoder
        self.fpn = fpn
        self.decoder = decoder
        self.taps = tuple(config.taps)
        encoder.norm.requires_grad_(False)
        encoder.blocks[max(self.taps):].requires_grad_(False)

    def no_weight_decay(self) -> set[str]:
        """Full parameter names that take no weight decay, besides norms and biases."""
        return ({f"encoder.{n}" for n in self.encoder.no_weight_decay()}
                | {f"decoder.{n}" for n in self.decoder.no_weight_decay()})

    def forward(self, image: Tensor, text_ids: Tensor, text_padding_mask: Tensor | None = None) -> SegmenterOutput:
        """Predict mask logits.

        Args:
            image: (B, 3, H, W) normalized pixels, H = W = the encoder's image size.
            text_ids: (B, L) token ids.
            text_padding_mask: (B, L) bool, True = padding; or None when nothing is padded.
        Returns:
            :class:`SegmenterOutput` with ``mask_logits`` (B, 1, H, W), in training and evaluation alike.
        """
        taps = self.encoder.forward_intermediates(image, text_ids, text_padding_mask, self.taps)
        feats = self.fpn(taps, text_padding_mask, self.encoder.cfg.grid_size, image)
        logits, presence, iou, anchor = self.decoder(feats.pixel, feats.mid, feats.text, text_padding_mask)
        logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)  # (B, 1, H, W)
        if iou is not None and self.decoder.cfg.iou_from_mask:  # the soft IoU of the mask as scored, full size
            iou = corrected_soft_iou(iou, logits[:, 0])
        if anchor is not None and self.training:
            anchor = F.interpolate(anchor, size=image.shape[-2:], mode="bilinear", align_corners=False)
        else:
            anchor = None
        return SegmenterOutput(logits, presence, iou, anchor)
