"""Microsoft's torchscale BEiT-3, built as the numerical and speed reference for our encoder.

Test and benchmark support only; sharedris never runs it. It needs
``pip install --no-deps torchscale==0.3.0 fairscale==0.4.0``. torchscale imports
``timm.models.layers.drop_path``; timm drags in torchvision, which does not import beside a CPU
torch wheel, so when timm is absent a stand-in module provides that one function.
"""

from __future__ import annotations

import sys
import types

import torch
from torch import nn

from sharedris.modeling.beit3 import BEiT3Config


def _drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    if drop_prob == 0.0 or not training:
        return x
    raise NotImplementedError("the reference is only built for inference (drop_path_rate=0)")


def _install_timm_stand_in() -> None:
    try:
        import timm.models.layers  # noqa: F401
    except Exception:  # absent, or present but broken by torchvision
        timm, models, layers = (types.ModuleType(n) for n in ("timm", "timm.models", "timm.models.layers"))
        layers.drop_path = _drop_path
        sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers})


def torchscale_beit3(cfg: BEiT3Config) -> nn.Module:
    """torchscale's ``BEiT3`` with the configuration unilm's BEiT-3 code uses, for ``cfg``'s size.

    Call it as ``model(textual_tokens=ids, visual_tokens=image, text_padding_position=pad)["encoder_out"]``;
    its ``state_dict()`` keys, prefixed with ``beit3.``, are those of the official checkpoints.
    """
    if cfg.stem != "patch":
        raise ValueError("the reference only has the official patch embedding")
    _install_timm_stand_in()
    try:
        from torchscale.architecture.config import EncoderConfig
        from torchscale.model.BEiT3 import BEiT3 as ReferenceBEiT3
    except ImportError as e:
        raise ImportError("the reference needs `pip install --no-deps torchscale==0.3.0 fairscale==0.4.0`"
                          f" ({e})") from None
    args = EncoderConfig(
        img_size=cfg.image_size, patch_size=cfg.patch_size, vocab_size=cfg.vocab_size, multiway=True,
        layernorm_embedding=False, normalize_output=True, no_output_layer=True,
        encoder_embed_dim=cfg.embed_dim, encoder_attention_heads=cfg.num_heads,
        encoder_ffn_embed_dim=cfg.mlp_dim, encoder_layers=cfg.depth,
        max_source_positions=cfg.max_text_positions, layernorm_eps=cfg.layernorm_eps,
    )
    return ReferenceBEiT3(args)
