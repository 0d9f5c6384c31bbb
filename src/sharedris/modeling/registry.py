"""Named Shared-RIS configurations and the builder that turns one into a model.

The registry is a plain dict of functions that return fresh :class:`ModelConfig` objects; nothing
is registered at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from sharedris.modeling.beit3 import BEiT3, BEiT3Config
from sharedris.modeling.config import ModelConfig
from sharedris.modeling.decoder import DecoderConfig, MaskDecoder
from sharedris.modeling.fpn import FPNConfig, SharedFPN
from sharedris.modeling.segmenter import SharedRIS


# ---------------------------------------------------------------------------------- registry
def _sharedris_tiny() -> ModelConfig:
    # Trained from scratch on CPU: a conv stem with patch 16 (8x8 tokens at 128 px; patch 8 learned
    # no better per step at 3.5x the cost), and a fine level that predicts the mask at output stride
    # 2 from the pixel features plus a conv of the image, which the small synthetic objects need.
    # Sine-cosine initial positions: with random ones, position and relation expressions stayed at
    # the shuffled-text control's level for 48k samples.
    return ModelConfig(
        encoder=BEiT3Config.tiny(image_size=128, embed_dim=192, depth=6, num_heads=3, mlp_dim=768,
                                 vocab_size=512, max_text_positions=64, patch_size=16, stem="conv",
                                 pos_init="sincos"),
        fpn=FPNConfig(width=64, num_heads=2, fine_width=32),
        decoder=DecoderConfig(num_heads=2),
        taps=(2, 4, 5, 6), text_len=24, tokenizer="tiny.spm",
    )


def _sharedris_base() -> ModelConfig:
    return ModelConfig(encoder=BEiT3Config.base(image_size=480), fpn=FPNConfig(pixel_width=64),
                       decoder=DecoderConfig(), taps=(4, 6, 8, 12), text_len=40, tokenizer="beit3.spm")


def _sharedris_large() -> ModelConfig:
    return ModelConfig(encoder=BEiT3Config.large(image_size=480), fpn=FPNConfig(pixel_width=64),
                       decoder=DecoderConfig(), taps=(8, 12, 16, 24), text_len=40, tokenizer="beit3.spm")


MODELS: dict[str, Callable[[], ModelConfig]] = {
    "sharedris_tiny": _sharedris_tiny,
    "sharedris_base": _sharedris_base,
    "sharedris_large": _sharedris_large,
}


def list_models() -> list[str]:
    """Names accepted by :func:`model_config` and :func:`build_model`."""
    return sorted(MODELS)


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """The named config with overrides applied (see :meth:`ModelConfig.replace`).

    Sub-configs take dicts of their fields (``fpn={"width": 128}``) or whole instances;
    ``image_size`` sets the encoder's input size.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names are {list_models()}")
    return MODELS[name]().replace(**overrides)


def build_model(name_or_config: str | ModelConfig, encoder_weights: str | Path | None = None,
                drop_path_rate: float = 0.0, **overrides: Any) -> SharedRIS:
    """Build a Shared-RIS model (random init except the encoder when weights are given).

    Args:
        name_or_config: a registered name (see :func:`list_models`) or a :class:`ModelConfig`.
        encoder_weights: optional official BEiT-3 checkpoint (``.pth`` or ``.safetensors``) for the encoder.
        drop_path_rate: stochastic depth of the encoder's deepest block (a training setting, not
            part of the config).
        overrides: as for :func:`model_config`.
    Returns:
        the model, in training mode, on the default device; ``model.config`` is its config.
    """
    if isinstance(name_or_config, ModelConfig):
        cfg = name_or_config.replace(**overrides)
    else:
        cfg = model_config(name_or_config, **overrides)
    encoder = BEiT3(cfg.encoder, drop_path_rate=drop_path_rate)
    if encoder_weights is not None:
        encoder.load_official_checkpoint(encoder_weights)
    return SharedRIS(
        encoder=encoder,
        fpn=SharedFPN(cfg.encoder.embed_dim, cfg.fpn, patch_size=cfg.encoder.patch_size),
        decoder=MaskDecoder(cfg.decoder, width=cfg.fpn.width, pixel_dim=cfg.fpn.output_channels),
        config=cfg,
    )
