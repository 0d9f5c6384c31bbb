"""Shared FPN: a feature pyramid over BEiT-3 taps whose coarse levels keep mixing image and text.

Four encoder taps (all on the g x g patch grid) become four pyramid levels relative to that grid:
P2 (4g), P3 (2g), P4 (g) and P5 (g/2). A top-down pass sums each level with the upsampled level
above it; at the levels listed in ``FPNConfig.shared_levels`` one Multiway block runs joint
attention over ``[level tokens ; text tokens]`` and refines the text on the way down. P2 has
(4g)^2 tokens (14,400 at 480 px), too many for attention, so it is always conv-only.

Optionally (``FPNConfig.fine_width``) a fine level P1 at 8g refines P2 with features computed
straight from the image: every level above P1 sees the image only through the patch grid, which
blurs the outlines of objects a few patches wide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from sharedris.modeling.multiway import MultiwayBlock, key_padding_to_attn_mask

ATTENTION_LEVELS = (5, 4, 3)  # levels that may hold a Shared block, coarse to fine


@dataclass
class FPNConfig:
    """Hyper-parameters of :class:`SharedFPN`.

    Args:
        width: channels C of every level and of the text tokens.
        pixel_width: channels of the 4g x 4g pixel features; None = ``width``. The pixel level has
            16x the positions of P4, so at 480 px its convs would dominate the whole head at
            full width: a narrower pixel level keeps the head light.
        num_heads: attention heads of the Shared blocks.
        mlp_ratio: FFN hidden width of the Shared blocks is ``width * mlp_ratio``.
        shared_levels: levels (among 5, 4, 3) mixed by a Shared Multiway block; the others by convs.
        fine_width: channels of the fine level P1 (8g x 8g, from P2 plus a strided conv of the
            image); 0 = no fine level, the mask is predicted on P2. Needs a patch size divisible by 8.
        eps: LayerNorm / GroupNorm epsilon.
    """

    width: int = 256
    pixel_width: int | None = None
    num_heads: int = 8
    mlp_ratio: float = 2.0
    shared_levels: tuple[int, ...] = (5, 4, 3)
    fine_width: int = 0
    eps: float = 1e-5

    def __post_init__(self) -> None:
        bad = sorted(set(self.shared_levels) - set(ATTENTION_LEVELS))
        if bad:
            raise ValueError(f"fpn.shared_levels {bad} are invalid; choose among {ATTENTION_LEVELS} "
                             "(P2 is always conv-only)")
        if self.fine_width < 0:
            raise ValueError(f"fpn.fine_width must be 0 (off) or positive, got {self.fine_width}")

    @property
    def pixel_channels(self) -> int:
        return self.pixel_width or self.width

    @property
    def output_channels(self) -> int:
        """Channels of the per-pixel features handed to the decoder (P1 if there is one, else P2)."""
        return self.fine_width or self.pixel_channels


class FPNOutput(NamedTuple):
    """What :class:`SharedFPN` hands to the mask decoder (a tuple, so it traces for export)."""

    pixel: Tensor  # (B, Co, 4g or 8g, ...) per-pixel features F (Co = cfg.output_channels)
    mid: Tensor  # (B, C, g, g) refined P4 level X4'
    text: Tensor  # (B, L, C) text tokens T' after the last Shared level


def group_norm(channels: int, eps: float) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: statistics are per sample, so batch 1 and DDP without SyncBN
    # behave exactly like any other batch size.
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=eps)


class ConvBlock(nn.Sequential):
    """3x3 conv -> GroupNorm -> GELU -> 3x3 conv: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, eps: float) -> None:
        super().__init__(
            nn.Conv2d(channels, channels, 3, padding=1),
            group_norm(channels, eps),
            nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )


class SharedLevel(nn.Module):
    """One Multiway block over ``[X flattened ; T]``: joint attention, per-modality everything else."""

    def __init__(self, cfg: FPNConfig) -> None:
        super().__init__()
        self.block = MultiwayBlock(cfg.width, cfg.num_heads, int(cfg.width * cfg.mlp_ratio), cfg.eps)

    def forward(self, x: Tensor, text: Tensor, text_padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """x (B, C, h, w), text (B, L, C), mask (B, L) True = pad -> (x', text') of the same shapes."""
        B, C, h, w = x.shape
        xv = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        xv, text = self.block(xv, text, key_padding_to_attn_mask(h * w, text_padding_mask))
        return xv.transpose(1, 2).reshape(B, C, h, w), text


class ConvLevel(nn.Module):
    """A level without a Shared block: a conv block on the map; the text passes through unchanged."""

    def __init__(self, cfg: FPNConfig) -> None:
        super().__init__()
        self.block = ConvBlock(cfg.width, cfg.eps)

    def forward(self, x: Tensor, text: Tensor, text_padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return self.block(x), text


def upsample_to(x: Tensor, target: Tensor) -> Tensor:
    """Bilinear resize of x to target's spatial size (sizes, not factors: P5 of an odd grid is floored)."""
    return F.interpolate(x, size=target.shape[-2:], mode="bilinear", align_corners=False)


class SharedFPN(nn.Module):
    """Shared FPN over four encoder taps.

    Args:
        in_dim: encoder width D of the taps.
        cfg: FPN hyper-parameters.
        patch_size: the encoder's patch size; sets the image conv's stride for the fine level.
    """

    def __init__(self, in_dim: int, cfg: FPNConfig, patch_size: int = 16) -> None:
        super().__init__()
        self.cfg = cfg
        D, C, Cp, eps = in_dim, cfg.width, cfg.pixel_channels, cfg.eps
        # Taps are raw residual-stream states taken before the encoder's final norm; their scale
        # grows with depth, so each gets its own LayerNorm.
        self.tap_norms = nn.ModuleList(nn.LayerNorm(D, eps=eps) for _ in range(4))
        # The trailing GroupNorm of every lateral puts all levels on one scale before the sums.
        self.laterals = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(D, Cp, 2, stride=2), group_norm(Cp, eps), nn.GELU(),
                          nn.ConvTranspose2d(Cp, Cp, 2, stride=2), group_norm(Cp, eps)),  # x4 -> P2
            nn.Sequential(nn.ConvTranspose2d(D, C, 2, stride=2), group_norm(C, eps)),  # x2 -> P3
            nn.Sequential(nn.Conv2d(D, C, 1), group_norm(C, eps)),  # x1 -> P4
            nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(D, C, 1), group_norm(C, eps)),  # x1/2 -> P5
        ])
        self.text_norm = nn.LayerNorm(D, eps=eps)
        self.text_proj = nn.Linear(D, C)
        self.levels = nn.ModuleDict({
            f"p{lv}": SharedLevel(cfg) if lv in cfg.shared_levels else ConvLevel(cfg) for lv in ATTENTION_LEVELS
        })
        self.pixel_in = nn.Conv2d(C, Cp, 1) if Cp != C else nn.Identity()  # at 2g, before upsampling
        self.pixel_block = ConvBlock(Cp, eps)
        if cfg.fine_width:
            if patch_size % 8:
                raise ValueError(f"fpn.fine_width needs a patch size divisible by 8 (P1 is at 8x the patch "
                                 f"grid), got {patch_size}")
            Cf = cfg.fine_width
            self.fine_image = nn.Sequential(nn.Conv2d(3, Cf, 3, stride=patch_size // 8, padding=1),
                                            group_norm(Cf, eps), nn.GELU(), nn.Conv2d(Cf, Cf, 3, padding=1))
            self.fine_in = nn.Conv2d(Cp, Cf, 1)
            self.fine_block = ConvBlock(Cf, eps)

    def forward(self, taps: Sequence[tuple[Tensor, Tensor]], text_padding_mask: Tensor | None,
                grid: int, image: Tensor | None = None) -> FPNOutput:
        """Build the pyramid and run the top-down pass.

        Args:
            taps: four (vision (B, 1+g*g, D), text (B, L, D)) pairs from
                :meth:`BEiT3.forward_intermediates`, shallow to deep; vision CLS first.
            text_padding_mask: (B, L) bool, True = padding; or None.
            grid: patch grid size g.
            image: (B, 3, H, W) the encoder's input; required with a fine level, unused otherwise.
        Returns:
            FPNOutput(pixel (B, Co, 4g or 8g, same), mid (B, C, g, g), text (B, L, C)).
        """
        if len(taps) != 4:
            raise ValueError(f"SharedFPN takes 4 encoder taps, got {len(taps)}")
        B, n, D = taps[0][0].shape
        if n != 1 + grid * grid:
            raise ValueError(f"taps have {n} vision tokens, expected 1 + {grid}x{grid} (CLS + patch grid)")
        p2, p3, p4, p5 = (
            lateral(norm(v[:, 1:]).transpose(1, 2).reshape(B, D, grid, grid))  # drop CLS -> (B, D, g, g)
            for (v, _), norm, lateral in zip(taps, self.tap_norms, self.laterals)
        )
        text = self.text_proj(self.text_norm(taps[3][1]))  # (B, L, C)

        x, text = self.levels["p5"](p5, text, text_padding_mask)  # (B, C, g/2, g/2)
        x, text = self.levels["p4"](p4 + upsample_to(x, p4), text, text_padding_mask)  # (B, C, g, g)
        mid = x
        x, text = self.levels["p3"](p3 + upsample_to(x, p3), text, text_padding_mask)  # (B, C, 2g, 2g)
        pixel = self.pixel_block(p2 + upsample_to(self.pixel_in(x), p2))  # (B, Cp, 4g, 4g)
        if self.cfg.fine_width:
            if image is None:
                raise ValueError("this FPN has a fine level (fpn.fine_width > 0): pass the image")
            p1 = self.fine_image(image)  # (B, Cf, 8g, 8g)
            pixel = self.fine_block(p1 + upsample_to(self.fine_in(pixel), p1))
        return FPNOutput(pixel=pixel, mid=mid, text=text)
