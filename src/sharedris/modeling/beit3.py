"""BEiT-3 Multiway Transformer encoder (our implementation; numerically equal to torchscale's BEiT3).

The encoder reads one sequence ``[vision CLS, patches..., text...]``. Each modality has its own
learned absolute position table, both indexed from 2 (the fairseq offset), and its own expert of
every sub-module; only softmax attention is joint (see :mod:`sharedris.modeling.multiway`).
"""

from __future__ import annotations

import argparse
import math
import pickle
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sharedris.modeling.multiway import Multiway, MultiwayBlock, key_padding_to_attn_mask

POSITION_OFFSET = 2  # fairseq: positions start at 2, rows 0 and 1 of each table are never used
BEIT3_VOCAB_SIZE = 64010


@dataclass
class BEiT3Config:
    """Hyper-parameters of a BEiT-3 encoder. Use :meth:`base`, :meth:`large` or :meth:`tiny`."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    vocab_size: int = BEIT3_VOCAB_SIZE
    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    max_text_positions: int = 1024
    layernorm_eps: float = 1e-5
    stem: str = "patch"  # "patch": one Conv2d (official); "conv": stride-2 3x3 convs (tiny, from scratch)
    # Initial patch positions: "normal" (small random, what pretrained weights then overwrite) or
    # "sincos" (2-D sine-cosine of the patch's row and column; still trained). From scratch, random
    # positions must first be learned before "leftmost" or "closest to" can be.
    pos_init: str = "normal"

    @classmethod
    def base(cls, image_size: int = 224, **overrides) -> "BEiT3Config":
        """BEiT-3 base: 12 layers, width 768, 12 heads, FFN 3072."""
        return replace(cls(image_size=image_size), **overrides)

    @classmethod
    def large(cls, image_size: int = 224, **overrides) -> "BEiT3Config":
        """BEiT-3 large: 24 layers, width 1024, 16 heads, FFN 4096."""
        cfg = cls(embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096, image_size=image_size)
        return replace(cfg, **overrides)

    @classmethod
    def tiny(cls, image_size: int = 160, **overrides) -> "BEiT3Config":
        """A small BEiT-3 layout for tests and CPU training from scratch (no pretrained weights)."""
        cfg = cls(embed_dim=256, depth=6, num_heads=4, mlp_dim=1024, image_size=image_size,
                  vocab_size=1000, max_text_positions=64)
        return replace(cfg, **overrides)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_vision_tokens(self) -> int:
        """Vision CLS + patches: the Multiway split position."""
        return self.grid_size**2 + 1


@dataclass
class LoadReport:
    """What :meth:`BEiT3.load_official_checkpoint` did."""

    loaded: list[str] = field(default_factory=list)  # our parameter names
    ignored: list[str] = field(default_factory=list)  # file keys not used (heads, mask token)
    resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)


class CheckpointError(ValueError):
    """A weights file that cannot be loaded; the message says why and what to do."""


def _build_stem(cfg: BEiT3Config) -> nn.Module:
    """Image (B, C, H, W) -> patch features (B, D, H/p, W/p)."""
    if cfg.stem == "patch":
        return nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
    if cfg.stem != "conv":
        raise ValueError(f"unknown stem {cfg.stem!r}; use 'patch' or 'conv'")
    stages = int(math.log2(cfg.patch_size))
    if 2**stages != cfg.patch_size:
        raise ValueError(f"a conv stem needs a power-of-two patch size, got {cfg.patch_size}")
    # A few strided 3x3 convs see overlapping neighbourhoods, which a model trained from scratch
    # on little data learns much faster than from disjoint 16x16 patches. Widths ramp up to D.
    layers: list[nn.Module] = []
    ch = cfg.in_chans
    for i in range(stages):
        out = cfg.embed_dim if i == stages - 1 else max(cfg.embed_dim // 2 ** (stages - 1 - i), 16)
        layers.append(nn.Conv2d(ch, out, kernel_size=3, stride=2, padding=1))
        if i < stages - 1:
            layers += [nn.GroupNorm(1, out, eps=cfg.layernorm_eps), nn.GELU()]
        ch = out
    return nn.Sequential(*layers)


class BEiT3(nn.Module):
    """BEiT-3 encoder over an image and a batch of token ids.

    ``forward`` returns the final normalized sequence; :meth:`forward_intermediates` returns the
    hidden states after chosen blocks for dense heads.
    """

    def __init__(self, cfg: BEiT3Config, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        D = cfg.embed_dim
        self.text_embed = nn.Embedding(cfg.vocab_size, D)
        self.patch_embed = _build_stem(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed_vision = nn.Parameter(torch.zeros(cfg.num_vision_tokens + POSITION_OFFSET, D))
        self.pos_embed_text = nn.Parameter(torch.zeros(cfg.max_text_positions, D))
        if cfg.pos_init not in ("normal", "sincos"):
            raise ValueError(f"unknown pos_init {cfg.pos_init!r}; use 'normal' or 'sincos'")
        rates = torch.linspace(0, drop_path_rate, cfg.depth, device="cpu").tolist()  # also under meta
        self.blocks = nn.ModuleList(
            MultiwayBlock(D, cfg.num_heads, cfg.mlp_dim, cfg.layernorm_eps, drop_path=r) for r in rates
        )
        self.norm = Multiway(lambda: nn.LayerNorm(D, eps=cfg.layernorm_eps))
        self.grad_checkpointing = False  # a training setting: set_grad_checkpointing
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=self.cfg.embed_dim**-0.5)
        for p in (self.cls_token, self.pos_embed_vision, self.pos_embed_text):
            nn.init.trunc_normal_(p, std=0.02)
        if self.cfg.pos_init == "sincos":
            with torch.no_grad():
                self.pos_embed_vision[POSITION_OFFSET + 1:] = sincos_2d(self.cfg.grid_size, self.cfg.embed_dim)

    # ----------------------------------------------------------------- interface for dense heads
    @property
    def num_vision_tokens(self) -> int:
        return self.cfg.num_vision_tokens

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) that take no weight decay, besides norms/biases."""
        return {"cls_token", "pos_embed_vision", "pos_embed_text"}

    def layer_id(self, name: str) -> int:
        """Depth index for layer-wise lr decay: 0 = embeddings, i+1 = block i, depth+1 = final norm."""
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        if name.startswith("norm."):
            return self.cfg.depth + 1
        return 0

    # ----------------------------------------------------------------- forward
    def embed(self, image: Tensor, text_ids: Tensor, text_padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Token embeddings plus positions: vision (B, 1+N, D), text (B, L, D) with padded rows zeroed."""
        B, _, H, W = image.shape
        size = self.cfg.image_size
        if (H, W) != (size, size):
            raise ValueError(f"image is {H}x{W}, but this encoder was built for {size}x{size}")
        L = text_ids.shape[1]
        if L > self.cfg.max_text_positions - POSITION_OFFSET:
            raise ValueError(f"text length {L} exceeds the position table "
                             f"({self.cfg.max_text_positions - POSITION_OFFSET} tokens)")
        xv = self.patch_embed(image).flatten(2).transpose(1, 2)  # (B, N, D)
        xv = torch.cat([self.cls_token.expand(B, -1, -1), xv], dim=1)  # (B, 1+N, D)
        xv = xv + self.pos_embed_vision[POSITION_OFFSET:POSITION_OFFSET + xv.shape[1]]
        xt = self.text_embed(text_ids) + self.pos_embed_text[POSITION_OFFSET:POSITION_OFFSET + L]
        if text_padding_mask is not None:
            xt = xt.masked_fill(text_padding_mask[..., None], 0.0)
        return xv, xt

    def _run_block(self, block: MultiwayBlock, xv: Tensor, xt: Tensor,
                   attn_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, xv, xt, attn_mask, use_reentrant=False)
        return block(xv, xt, attn_mask)

    def forward_intermediates(self, image: Tensor, text_ids: Tensor, text_padding_mask: Tensor | None,
                              indices: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
        """Hidden states after the given blocks (1-based, e.g. (4, 6, 8, 12)), before the final norm.

        Args:
            image: (B, 3, H, W) normalized pixels, H = W = cfg.image_size.
            text_ids: (B, L) token ids.
            text_padding_mask: (B, L) bool, True = padding; or None.
            indices: block numbers in 1..depth. Blocks after the last one are not run.
        Returns:
            one (vision (B, 1+N, D), text (B, L, D)) pair per index, in the order given.
        """
        bad = [i for i in indices if not 1 <= i <= self.cfg.depth]
        if bad:
            raise ValueError(f"tap indices {bad} are outside 1..{self.cfg.depth}")
        xv, xt = self.embed(image, text_ids, text_padding_mask)
        attn_mask = key_padding_to_attn_mask(xv.shape[1], text_padding_mask)
        states: dict[int, tuple[Tensor, Tensor]] = {}
        for i, block in enumerate(self.blocks[:max(indices)], start=1):
            xv, xt = self._run_block(block, xv, xt, attn_mask)
            if i in indices:
                states[i] = (xv, xt)
        return [states[i] for i in indices]

    def forward(self, image: Tensor, text_ids: Tensor, text_padding_mask: Tensor | None = None) -> Tensor:
        """Encode image and text together.

        Args:
            image: (B, 3, H, W) normalized pixels.
            text_ids: (B, L) token ids.
            text_padding_mask: (B, L) bool, True = padding; or None.
        Returns:
            (B, 1+N+L, D): the final normalized sequence, vision CLS first.
        """
        xv, xt = self.forward_intermediates(image, text_ids, text_padding_mask, [self.cfg.depth])[0]
        return torch.cat(self.norm(xv, xt), dim=1)

    # ----------------------------------------------------------------- official weights
    def load_official_checkpoint(self, path: str | Path) -> LoadReport:
        """Load an official BEiT-3 checkpoint (``.pth`` with ``{"model": {"beit3.*": ...}}``, or a
        ``.safetensors`` file with the same keys) into this encoder.

        Weights are cast to fp32; the vision position grid is resampled bicubically to this
        encoder's image size. Every encoder parameter must be present; keys that are not part of
        the encoder (pretraining heads, the mask token) are ignored and listed in the report.
        """
        state = read_official_state_dict(path)
        converted, ignored = convert_official_state_dict(state)
        report = LoadReport(ignored=ignored)
        own = self.state_dict()
        missing = sorted(set(own) - set(converted))
        if missing:
            raise CheckpointError(f"{path} lacks encoder weights {missing[:5]}"
                                  f"{' ...' if len(missing) > 5 else ''}; is it a BEiT-3 checkpoint?")
        for name, tensor in converted.items():
            if name not in own:
                report.ignored.append(name)
                continue
            tensor = tensor.float()
            if name == "pos_embed_vision" and tensor.shape != own[name].shape:
                report.resized[name] = (tuple(tensor.shape), tuple(own[name].shape))
                tensor = resample_vision_positions(tensor, self.cfg.grid_size)
            if tensor.shape != own[name].shape:
                raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)} but this encoder "
                                      f"expects {tuple(own[name].shape)}; check the model size (base/large)")
            own[name].copy_(tensor)
            report.loaded.append(name)
        return report


def sincos_2d(grid: int, dim: int) -> Tensor:
    """(grid*grid, dim) 2-D sine-cosine position codes, row-major: a quarter of the channels each
    for sin/cos of the row and of the column, at geometrically spaced frequencies."""
    if dim % 4:
        raise ValueError(f"sincos positions need a width divisible by 4, got {dim}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    pos = torch.arange(grid, dtype=torch.float64)[:, None] * freqs  # (grid, dim/4)
    rows = torch.cat([pos.sin(), pos.cos()], dim=1)  # (grid, dim/2)
    codes = torch.cat([rows[:, None].expand(grid, grid, -1), rows[None].expand(grid, grid, -1)], dim=2)
    return codes.reshape(grid * grid, dim).float()


def resample_vision_positions(table: Tensor, grid: int) -> Tensor:
    """Resize a vision position table (3 + g*g, D) to (3 + grid*grid, D).

    The first 3 rows (2 offset rows + CLS) are kept; the g x g grid is resampled bicubically.
    """
    lead, rest = table[:POSITION_OFFSET + 1], table[POSITION_OFFSET + 1:]
    old = math.isqrt(rest.shape[0])
    if old * old != rest.shape[0]:
        raise CheckpointError(f"vision position table with {rest.shape[0]} grid rows is not a square grid")
    img = rest.reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([lead, img.permute(0, 2, 3, 1).reshape(grid * grid, -1)], dim=0)


def read_official_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a BEiT-3 weights file without ever executing pickled code.

    ``.pth`` files are opened with ``torch.load(weights_only=True)`` allowing only
    ``argparse.Namespace`` (the ``args`` entry of files saved by the BEiT-3 fine-tuning code).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} was refused: it contains pickled objects other than tensors "
                              f"and is not loaded for safety ({first_line})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({e})") from None
    if isinstance(obj, dict):
        for key in ("model", "module", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return obj


_EXPERTS = ("A", "B")


def convert_official_state_dict(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Map official BEiT-3 keys (prefix ``beit3.``) to ours; returns (converted, ignored keys).

    q/k/v projections of each expert are concatenated into our fused ``qkv`` projection.
    """
    prefix = "beit3."
    src = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    ignored = sorted(k for k in state if not k.startswith(prefix))
    out: dict[str, Tensor] = {}
    simple = {
        "text_embed.weight": "text_embed.weight",
        "vision_embed.cls_token": "cls_token",
        "vision_embed.proj.weight": "patch_embed.weight",
        "vision_embed.proj.bias": "patch_embed.bias",
        "encoder.embed_positions.A.weight": "pos_embed_vision",
        "encoder.embed_positions.B.weight": "pos_embed_text",
    }
    for theirs, ours in simple.items():
        if theirs in src:
            out[ours] = src.pop(theirs)
    layer_map = {
        "self_attn_layer_norm": "norm1",
        "self_attn.inner_attn_ln": "inner_norm",
        "self_attn.out_proj": "proj",
        "final_layer_norm": "norm2",
    }
    ffn_map = {"fc1": "fc1", "fc2": "fc2", "ffn_layernorm": "norm"}
    layer_ids = sorted({int(k.split(".")[2]) for k in src if k.startswith("encoder.layers.")})
    for i in layer_ids:
        pre = f"encoder.layers.{i}."
        for e in _EXPERTS:
            for p in ("weight", "bias"):
                for theirs, ours in layer_map.items():
                    key = f"{pre}{theirs}.{e}.{p}"
                    if key in src:
                        out[f"blocks.{i}.{ours}.{e}.{p}"] = src.pop(key)
                for theirs, ours in ffn_map.items():
                    key = f"{pre}ffn.{e}.{theirs}.{p}"
                    if key in src:
                        out[f"blocks.{i}.mlp.{e}.{ours}.{p}"] = src.pop(key)
                qkv = [f"{pre}self_attn.{n}_proj.{e}.{p}" for n in ("q", "k", "v")]
                if all(k in src for k in qkv):
                    out[f"blocks.{i}.qkv.{e}.{p}"] = torch.cat([src.pop(k) for k in qkv], dim=0)
    for e in _EXPERTS:
        for p in ("weight", "bias"):
            key = f"encoder.layer_norm.{e}.{p}"
            if key in src:
                out[f"norm.{e}.{p}"] = src.pop(key)
    ignored += sorted(prefix + k for k in src)  # e.g. vision_embed.mask_token (pretraining only)
    return out, ignored
