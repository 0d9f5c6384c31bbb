"""Shared-RIS: BEiT-3 encoder -> Shared FPN -> Shared Mask Decoder, one mask per (image, text) pair."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from sharedris.modeling.beit3 import BEiT3
from sharedris.modeling.decoder import MaskDecoder
from sharedris.modeling.fpn import SharedFPN


class SharedRIS(nn.Module):
    """Referring image segmentation with one encoder for image and text.

    Args:
        encoder: BEiT-3 encoder; kept under the attribute name ``encoder`` so that trainers can
            tell pretrained parameters (``encoder.*``) from new ones.
        fpn: Shared FPN built for ``encoder``'s width.
        decoder: mask decoder of the FPN's width.
        taps: the four encoder blocks (1-based) whose hidden states feed the FPN, shallow to deep.

    Encoder parts that this model never runs (the final norm, which the taps precede, and any block
    after the deepest tap) are frozen: they stay in the state dict for checkpoint compatibility, but
    trainable parameters without gradients would break DDP without ``find_unused_parameters``.
    """

    def __init__(self, encoder: BEiT3, fpn: SharedFPN, decoder: MaskDecoder, taps: tuple[int, ...]) -> None:
        super().__init__()
        if len(taps) != 4:
            raise ValueError(f"SharedRIS needs 4 encoder taps (one per pyramid level), got {tuple(taps)}")
        if fpn.cfg.width != decoder.cfg.width:
            raise ValueError(f"FPN width {fpn.cfg.width} differs from decoder width {decoder.cfg.width}; "
                             "set both to the same value")
        self.encoder = encoder
        self.fpn = fpn
        self.decoder = decoder
        self.taps = tuple(taps)
        encoder.norm.requires_grad_(False)
        encoder.blocks[max(self.taps):].requires_grad_(False)

    def no_weight_decay(self) -> set[str]:
        """Full parameter names that take no weight decay, besides norms and biases."""
        return ({f"encoder.{n}" for n in self.encoder.no_weight_decay()}
                | {f"decoder.{n}" for n in self.decoder.no_weight_decay()})

    def forward(self, image: Tensor, text_ids: Tensor, text_padding_mask: Tensor | None = None) -> Tensor:
        """Predict mask logits.

        Args:
            image: (B, 3, H, W) normalized pixels, H = W = the encoder's image size.
            text_ids: (B, L) token ids.
            text_padding_mask: (B, L) bool, True = padding; or None when nothing is padded.
        Returns:
            (B, 1, H, W) mask logits (sigmoid > 0.5 is the mask), in training and evaluation alike.
        """
        taps = self.encoder.forward_intermediates(image, text_ids, text_padding_mask, self.taps)
        feats = self.fpn(taps, text_padding_mask, self.encoder.cfg.grid_size, image)
        logits = self.decoder(feats.pixel, feats.mid, feats.text, text_padding_mask)  # (B, 1, 4g or 8g, same)
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
