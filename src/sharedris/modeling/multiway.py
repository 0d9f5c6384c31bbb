"""Multiway Transformer block: the building unit of BEiT-3 and of the Shared FPN / Mask Decoder.

A Multiway block holds two copies ("experts") of every sub-module: ``A`` for vision tokens and
``B`` for text tokens. Only the softmax attention runs over the joint sequence ``[vision ; text]``;
LayerNorms, projections and the FFN are applied per modality. We keep the two modalities in
separate tensors and concatenate them only for keys/values, which avoids the split/concat per
sub-module that a "split the sequence at a position" implementation pays.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Multiway(nn.Module):
    """Two experts of the same shape: ``A`` applied to vision tokens, ``B`` to text tokens."""

    def __init__(self, make: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.A = make()
        self.B = make()

    def forward(self, xv: Tensor, xt: Tensor) -> tuple[Tensor, Tensor]:
        return self.A(xv), self.B(xt)


class SubLNMlp(nn.Module):
    """FFN with Sub-LN: fc1 -> GELU (erf) -> LayerNorm -> fc2."""

    def __init__(self, dim: int, hidden_dim: int, eps: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.norm = nn.LayerNorm(hidden_dim, eps=eps)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.norm(F.gelu(self.fc1(x))))


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zero the whole residual branch of a sample with probability ``p``."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class MultiwayBlock(nn.Module):
    """Pre-LN Multiway Transformer block with Sub-LN (BEiT-3 layout, no layer scale).

    Args:
        dim: token width D.
        num_heads: attention heads (D must be divisible by it).
        mlp_dim: FFN hidden width.
        eps: LayerNorm epsilon.
        drop_path: stochastic-depth probability of both residual branches.
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, eps: float = 1e-5,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.drop_path = drop_path
        self.norm1 = Multiway(lambda: nn.LayerNorm(dim, eps=eps))
        # q, k and v of one expert fused into one (3D, D) projection: exact, and one GEMM instead of three.
        self.qkv = Multiway(lambda: nn.Linear(dim, 3 * dim))
        self.inner_norm = Multiway(lambda: nn.LayerNorm(dim, eps=eps))
        self.proj = Multiway(lambda: nn.Linear(dim, dim))
        self.norm2 = Multiway(lambda: nn.LayerNorm(dim, eps=eps))
        self.mlp = Multiway(lambda: SubLNMlp(dim, mlp_dim, eps))

    def attention(self, xv: Tensor, xt: Tensor, attn_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Joint softmax attention over ``[xv ; xt]`` with per-modality projections."""
        B, Nv, D = xv.shape
        Nt = xt.shape[1]
        h = self.num_heads
        qkv_v, qkv_t = self.qkv(xv, xt)
        qkv = torch.cat([qkv_v, qkv_t], dim=1)  # (B, Nv+Nt, 3D)
        q, k, v = qkv.view(B, Nv + Nt, 3, h, D // h).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, D/h)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, N, D/h)
        out = out.transpose(1, 2).reshape(B, Nv + Nt, D)
        ov, ot = self.inner_norm(out[:, :Nv], out[:, Nv:])
        return self.proj(ov, ot)

    def forward(self, xv: Tensor, xt: Tensor, attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Run the block.

        Args:
            xv: vision tokens (B, Nv, D).
            xt: text tokens (B, Nt, D).
            attn_mask: None, or a boolean key mask (B, 1, 1, Nv+Nt), True = may be attended
                (see :func:`key_padding_to_attn_mask`).
        Returns:
            (vision tokens (B, Nv, D), text tokens (B, Nt, D)).
        """
        av, at = self.attention(*self.norm1(xv, xt), attn_mask)
        xv = xv + drop_path(av, self.drop_path, self.training)
        xt = xt + drop_path(at, self.drop_path, self.training)
        fv, ft = self.mlp(*self.norm2(xv, xt))
        xv = xv + drop_path(fv, self.drop_path, self.training)
        xt = xt + drop_path(ft, self.drop_path, self.training)
        return xv, xt


def key_padding_to_attn_mask(num_vision: int, text_padding_mask: Tensor | None) -> Tensor | None:
    """Boolean SDPA mask (B, 1, 1, Nv+Nt), True = attend, from a text padding mask (B, Nt), True = pad.

    No data-dependent branch (an all-False mask is still a mask), so the graph traces for export.
    """
    if text_padding_mask is None:
        return None
    B = text_padding_mask.shape[0]
    keep_vision = text_padding_mask.new_ones((B, num_vision))
    return torch.cat([keep_vision, ~text_padding_mask], dim=1)[:, None, None, :]
