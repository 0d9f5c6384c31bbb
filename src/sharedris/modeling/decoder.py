"""Shared Mask Decoder: one query token, joint self-attention with text and image, a dot-product mask.

There is no cross-attention: the query is one more token of the text stream of a few Multiway
blocks whose vision stream is the refined P4 map of the Shared FPN. The query's output becomes a
mask embedding m, and the mask logits are the dot product of m with every pixel feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sharedris.modeling.multiway import MultiwayBlock, key_padding_to_attn_mask


@dataclass
class DecoderConfig:
    """Hyper-parameters of :class:`MaskDecoder`.

    The token width is the FPN's (``FPNConfig.width``), passed to :class:`MaskDecoder`.

    Args:
        presence_head: predict, from the query, a logit that anything in the image matches the
            expression (generalized referring segmentation: no-target expressions).
        iou_head: predict, from the query, the IoU of the model's own thresholded mask with the
            target (a quality score, as SAM's IoU head).
        iou_from_mask: the IoU head predicts a correction to the mask's own soft IoU (the IoU the
            thresholded mask would have in expectation if its pixel probabilities were right, see
            :func:`soft_iou`) instead of the IoU itself: ``1 - (1 - soft IoU) * exp(correction)``
            (:func:`corrected_soft_iou`), applied by the model on its full-size logits. The query
            alone hardly tells a 0.98 mask from a 0.90 one; how sharp the mask's edges are does
            (docs/evaluation.md). Checkpoints saved before this setting existed predicted the IoU
            itself (they load with it off).
        coord_features: add to the pixel features a learned linear map of each pixel's coordinates
            (x, y, x^2, y^2 and xy, in [-1, 1] across the map; the map starts at zero). The mask
            logit <m, F> then holds a quadratic function of the position that the query chooses,
            such as a bowl around an anchor ("the circle closest to the triangle") or a ramp ("the
            leftmost star"), besides what the pixel features say. Off in the paper-sized models.
        anchor_point: the query also marks the anchor of a relation (in "the circle farthest from
            the triangle", the triangle) with a second mask embedding over the same pixel features;
            that mask's centre of mass (its pixel probabilities as weights) is a point, and the mask
            logit gains ``16 * a * d^2``, d the distance of each pixel from the point (coordinates
            in [-1, 1] across the map) and a a signed number from the query (starting at zero; a
            positive a ranks the farthest pixels first, a negative one the closest). Training supervises the anchor's mask
            where the data names an anchor (:attr:`SegmenterOutput.anchor_logits`), so the point is
            learned by itself rather than only through the ranking it serves. Off in the
            paper-sized models.
        anchor_gated: with ``anchor_point``, the term applies only where the mask already is, and
            about its mean there: ``16 * a * p * (d^2 - mean_p d^2)``, p the mask's own probability
            before the term (not trained through) and mean_p the p-weighted mean. It then moves
            the candidates the mask holds against one another and leaves the background as the
            pixel features put it.
        depth: number of Multiway blocks N_dec.
        num_heads: attention heads.
        mlp_ratio: FFN hidden width is ``width * mlp_ratio``.
        eps: LayerNorm epsilon.
    """

    depth: int = 2
    num_heads: int = 8
    presence_head: bool = True
    iou_head: bool = True
    iou_from_mask: bool = True
    coord_features: bool = False
    anchor_point: bool = False
    anchor_gated: bool = False
    mlp_ratio: float = 2.0
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"decoder.depth must be at least 1 (the query must see the image), got {self.depth}")
        if self.anchor_gated and not self.anchor_point:
            raise ValueError("decoder.anchor_gated shapes the anchor point's term: set decoder.anchor_point too")


class MaskDecoder(nn.Module):
    """Predict one mask per (image, expression) pair from Shared FPN outputs.

    Args:
        cfg: decoder hyper-parameters.
        width: token width C, the FPN's width.
        pixel_dim: channels Cp of the FPN's pixel features (``FPNConfig.output_channels``).
    """

    def __init__(self, cfg: DecoderConfig, width: int, pixel_dim: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        C = width
        Cp = pixel_dim or C
        self.query_proj = nn.Linear(C, C)
        self.query_embed = nn.Parameter(torch.zeros(1, 1, C))
        nn.init.trunc_normal_(self.query_embed, std=0.02)
        self.blocks = nn.ModuleList(
            MultiwayBlock(C, cfg.num_heads, int(C * cfg.mlp_ratio), cfg.eps) for _ in range(cfg.depth)
        )
        self.query_norm = nn.LayerNorm(C, eps=cfg.eps)  # the blocks are pre-LN: their output is not normalized
        self.mask_mlp = nn.Sequential(nn.Linear(C, C), nn.GELU(), nn.Linear(C, C), nn.GELU(), nn.Linear(C, Cp))
        # Two small heads on the same query: it has seen the whole image and the whole expression.
        self.presence_mlp = _head(C) if cfg.presence_head else None
        self.iou_mlp = _head(C) if cfg.iou_head else None
        if self.iou_mlp is not None and cfg.iou_from_mask:
            nn.init.zeros_(self.iou_mlp[-1].weight)  # a new head starts from the mask's soft IoU
            nn.init.zeros_(self.iou_mlp[-1].bias)
        self.mid_to_pixel = nn.Linear(C, Cp) if Cp != C else nn.Identity()
        self.coord_proj = nn.Linear(COORD_CHANNELS, Cp, bias=False) if cfg.coord_features else None
        if self.coord_proj is not None:
            nn.init.zeros_(self.coord_proj.weight)  # starts as no change to the pixel features
        self.anchor_mlp = nn.Sequential(nn.Linear(C, C), nn.GELU(), nn.Linear(C, Cp)) if cfg.anchor_point else None
        self.bowl_mlp = _head(C) if cfg.anchor_point else None
        if self.bowl_mlp is not None:
            nn.init.zeros_(self.bowl_mlp[-1].weight)  # starts as no change to the mask logits
            nn.init.zeros_(self.bowl_mlp[-1].bias)
        # <m, F> sums Cp products: 1/sqrt(Cp) keeps the initial logits O(1), as in scaled attention.
        self.logit_scale = nn.Parameter(torch.tensor(Cp**-0.5))
        self.logit_bias = nn.Parameter(torch.zeros(()))

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) that take no weight decay, besides norms/biases."""
        return {"query_embed", "logit_scale", "logit_bias"}

    def forward(self, pixel: Tensor, mid: Tensor, text: Tensor,
                text_padding_mask: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """Decode mask logits, the presence logit and predicted IoU where the heads exist, and the
        anchor's mask logits with ``anchor_point``.

        Args:
            pixel: (B, Cp, h, w) pixel features F (4g x 4g, or 8g x 8g with a fine level).
            mid: (B, C, g, g) refined P4 map X4'.
            text: (B, L, C) refined text tokens T'; token 0 is the sentence start, never padding.
            text_padding_mask: (B, L) bool, True = padding; or None.
        Returns:
            (B, 1, h, w) mask logits at the pixel-feature resolution; (B,) presence logits or None;
            (B,) predicted IoU (unbounded regression output), or with ``iou_from_mask`` the
            correction for :func:`corrected_soft_iou`, or None; (B, 1, h, w) anchor mask logits or None.
        """
        B, C, g, _ = mid.shape
        query = self.query_proj(text[:, :1]) + self.query_embed  # (B, 1, C)
        xt = torch.cat([query, text], dim=1)  # (B, 1+L, C): the query rides in the text stream
        xv = mid.flatten(2).transpose(1, 2)  # (B, g*g, C)
        if text_padding_mask is not None:
            text_padding_mask = torch.cat([text_padding_mask.new_zeros(B, 1), text_padding_mask], dim=1)
        attn_mask = key_padding_to_attn_mask(g * g, text_padding_mask)
        for block in self.blocks:
            xv, xt = block(xv, xt, attn_mask)
        q = self.query_norm(xt[:, 0])  # (B, C)
        m = self.mask_mlp(q)  # (B, Cp)
        presence = self.presence_mlp(q)[:, 0] if self.presence_mlp is not None else None  # (B,)
        # The last block's vision stream (attention output projection, FFN) would otherwise be computed
        # and never used, leaving parameters without gradients (which DDP rejects). Adding the
        # query-aware map into the pixel features, as SAM does with its updated image embedding, uses it.
        xv = self.mid_to_pixel(xv).transpose(1, 2).reshape(B, -1, g, g)  # (B, Cp, g, g)
        pixel = pixel + F.interpolate(xv, size=pixel.shape[-2:], mode="bilinear", align_corners=False)
        if self.coord_proj is not None:
            h, w = pixel.shape[-2:]
            coords = self.coord_proj(coordinate_channels(h, w, pixel.device, pixel.dtype))  # (h, w, Cp)
            pixel = pixel + coords.permute(2, 0, 1).unsqueeze(0)
        logits = self._dot(m, pixel)  # (B, h, w)
        anchor = None
        if self.anchor_mlp is not None:
            anchor = self._dot(self.anchor_mlp(q), pixel)  # (B, h, w)
            d2 = squared_distance_from_centre(anchor)
            if self.cfg.anchor_gated:
                d2 = _within_mask(d2, logits)
            logits = logits + 16 * self.bowl_mlp(q)[:, :, None] * d2
            anchor = anchor.unsqueeze(1)
        iou = self.iou_mlp(q)[:, 0] if self.iou_mlp is not None else None  # (B,)
        return logits.unsqueeze(1), presence, iou, anchor

    def _dot(self, embedding: Tensor, pixel: Tensor) -> Tensor:
        """(B, h, w) mask logits of a (B, Cp) mask embedding over (B, Cp, h, w) pixel features."""
        return torch.einsum("bc,bchw->bhw", embedding, pixel) * self.logit_scale + self.logit_bias


COORD_CHANNELS = 5


def coordinate_channels(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(h, w, 5): x, y, x^2, y^2 and xy of each pixel centre, x and y running from -1 to 1 across the map."""
    y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * (2 / h) - 1
    x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * (2 / w) - 1
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    return torch.stack([xx, yy, xx * xx, yy * yy, xx * yy], dim=-1).to(dtype)


def squared_distance_from_centre(logits: Tensor) -> Tensor:
    """(B, h, w) squared distance of each pixel from the centre of mass of ``sigmoid(logits)``.

    Coordinates run from -1 to 1 across the map (:func:`coordinate_channels`); computed in float32.
    The less probability a mask holds in all (below 1e-6), the nearer its centre is to the map's centre.

    Args:
        logits: (B, h, w) mask logits.
    """
    h, w = logits.shape[-2:]
    coords = coordinate_channels(h, w, logits.device, torch.float32)[..., :2]  # (h, w, 2): x, y
    p = torch.sigmoid(logits.float())
    weights = p / p.sum(dim=(1, 2), keepdim=True).clamp(min=1e-6)
    centre = torch.einsum("bhw,hwk->bk", weights, coords)  # (B, 2)
    return ((coords[None] - centre[:, None, None]) ** 2).sum(-1).to(logits.dtype)


def _within_mask(values: Tensor, logits: Tensor) -> Tensor:
    """(B, h, w) ``p * (values - mean_p values)``, p = sigmoid of the (detached) mask ``logits``."""
    p = torch.sigmoid(logits.detach().float())
    v = values.float()
    mean = (p * v).sum(dim=(1, 2), keepdim=True) / p.sum(dim=(1, 2), keepdim=True).clamp(min=1e-6)
    return (p * (v - mean)).to(values.dtype)


def soft_iou(logits: Tensor) -> Tensor:
    """The IoU each mask ``logits > 0`` would have in expectation if ``sigmoid(logits)`` were right.

    With p the pixel probabilities and M the thresholded mask, ``sum_M p / (|M| + sum_notM p)``:
    the expected intersection over the expected union (a ratio of expectations), 1 for an empty
    mask with no probability anywhere. Computed in float32.

    Args:
        logits: (B, h, w) mask logits.
    Returns:
        (B,) values in [0, 1].
    """
    logits = logits.float().flatten(1)
    p = torch.sigmoid(logits)
    inside = (logits > 0).float()
    inter = (p * inside).sum(dim=1)
    union = inside.sum(dim=1) + (p * (1 - inside)).sum(dim=1)
    return torch.where(union > 0, inter / union.clamp(min=1e-6), torch.ones_like(union))


def _head(width: int) -> nn.Sequential:
    """A two-layer MLP from the query to one number."""
    return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1))


def corrected_soft_iou(correction: Tensor, logits: Tensor) -> Tensor:
    """The predicted IoU of ``iou_from_mask``: ``1 - (1 - soft_iou(logits)) * exp(correction)``.

    The correction scales the mask's expected error rather than adding to its IoU, so a correction
    learned from the query keeps the order of near-perfect masks that the soft IoU gives. The
    logits are detached: the quality estimate does not train the mask.

    Args:
        correction: (B,) the IoU head's output.
        logits: (B, h, w) mask logits.
    Returns:
        (B,) float32 predicted IoU (at most 1).
    """
    return 1.0 - (1.0 - soft_iou(logits.detach())) * torch.exp(correction.float())
