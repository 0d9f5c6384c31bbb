"""Named Shared-RIS configurations and the builder that turns one into a model.

A :class:`ModelConfig` holds the architecture and the preprocessing its weights expect, so a
checkpoint that stores ``ModelConfig.to_dict()`` describes itself. The registry is a plain dict of
functions that return fresh configs; nothing is registered at import time.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

from sharedris.modeling.beit3 import POSITION_OFFSET, BEiT3, BEiT3Config
from sharedris.modeling.decoder import DecoderConfig, MaskDecoder
from sharedris.modeling.fpn import FPNConfig, SharedFPN
from sharedris.modeling.segmenter import SharedRIS


@dataclass
class ModelConfig:
    """Architecture plus preprocessing of one Shared-RIS model.

    Args:
        encoder, fpn, decoder: sub-module hyper-parameters.
        taps: four encoder blocks (1-based) feeding the FPN, shallow to deep.
        image_size: square input size in pixels (equals ``encoder.image_size``).
        text_len: token length L that texts are padded/truncated to.
        tokenizer: file name of the sentencepiece model shipped with the weights.
        mean, std: per-channel pixel normalization applied after scaling to [0, 1].
    """

    encoder: BEiT3Config
    fpn: FPNConfig
    decoder: DecoderConfig
    taps: tuple[int, ...]
    image_size: int
    text_len: int
    tokenizer: str
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        enc = self.encoder
        if len(self.taps) != 4 or not all(1 <= t <= enc.depth for t in self.taps):
            raise ValueError(f"taps {self.taps} must be 4 block numbers in 1..{enc.depth} (encoder.depth)")
        if self.fpn.width != self.decoder.width:
            raise ValueError(f"fpn.width {self.fpn.width} differs from decoder.width {self.decoder.width}; "
                             "set both to the same value")
        if self.image_size != enc.image_size:
            raise ValueError(f"image_size {self.image_size} differs from encoder.image_size {enc.image_size}; "
                             "make them equal (overriding image_size alone sets both)")
        if self.text_len > enc.max_text_positions - POSITION_OFFSET:
            raise ValueError(f"text_len {self.text_len} exceeds the encoder's text positions "
                             f"({enc.max_text_positions - POSITION_OFFSET}); raise encoder.max_text_positions")
        if not len(self.mean) == len(self.std) == enc.in_chans:
            raise ValueError(f"mean and std need {enc.in_chans} values (one per input channel)")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples as lists); :meth:`from_dict` inverts it exactly."""
        return _thaw(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Rebuild a config from :meth:`to_dict` output (or its JSON round trip).

        Unknown keys are errors; keys missing from a sub-config take that sub-config's defaults,
        so checkpoints written before a field existed still load.
        """
        _check_keys(cls, d, "model config")
        missing = [f.name for f in fields(cls) if f.name not in d and f.default is MISSING]
        if missing:
            raise ValueError(f"model config lacks {missing}; was it written by ModelConfig.to_dict()?")
        values = {k: _section(_SECTIONS[k], v, k) if k in _SECTIONS else _freeze(v) for k, v in d.items()}
        return cls(**values)


_SECTIONS: dict[str, type] = {"encoder": BEiT3Config, "fpn": FPNConfig, "decoder": DecoderConfig}


def _freeze(value: Any) -> Any:
    """Lists become tuples: config values are immutable, and JSON has no tuples."""
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


def _thaw(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _thaw(v) for k, v in value.items()}
    return [_thaw(v) for v in value] if isinstance(value, (list, tuple)) else value


def _check_keys(cls: type, d: dict[str, Any], where: str) -> None:
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise ValueError(f"unknown {where} key(s) {unknown}; valid keys are {valid}")


def _section(cls: type, value: Any, name: str, base: Any = None) -> Any:
    """A sub-config from a dict (over ``base`` when given) or an instance of ``cls`` as is."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict of {cls.__name__} fields, got {type(value).__name__}")
    _check_keys(cls, value, name)
    value = {k: _freeze(v) for k, v in value.items()}
    return replace(base, **value) if base is not None else cls(**value)


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
        decoder=DecoderConfig(width=64, num_heads=2),
        taps=(2, 4, 5, 6), image_size=128, text_len=24, tokenizer="tiny.spm",
    )


def _sharedris_base() -> ModelConfig:
    return ModelConfig(encoder=BEiT3Config.base(image_size=480), fpn=FPNConfig(pixel_width=64),
                       decoder=DecoderConfig(), taps=(4, 6, 8, 12), image_size=480, text_len=40, tokenizer="beit3.spm")


def _sharedris_large() -> ModelConfig:
    return ModelConfig(encoder=BEiT3Config.large(image_size=480), fpn=FPNConfig(pixel_width=64),
                       decoder=DecoderConfig(), taps=(8, 12, 16, 24), image_size=480, text_len=40, tokenizer="beit3.spm")


MODELS: dict[str, Callable[[], ModelConfig]] = {
    "sharedris_tiny": _sharedris_tiny,
    "sharedris_base": _sharedris_base,
    "sharedris_large": _sharedris_large,
}


def list_models() -> list[str]:
    """Names accepted by :func:`model_config` and :func:`build_model`."""
    return sorted(MODELS)


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """The named config with overrides applied.

    Sub-configs take dicts of their fields (``fpn={"width": 128}``) or whole instances. Overriding
    ``image_size`` also sets ``encoder.image_size`` unless the encoder override names it.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names are {list_models()}")
    return apply_overrides(MODELS[name](), **overrides)


def apply_overrides(cfg: ModelConfig, **overrides: Any) -> ModelConfig:
    """``cfg`` with overrides applied (see :func:`model_config`); ``cfg`` itself is unchanged."""
    _check_keys(ModelConfig, overrides, "model config")
    changes = {k: _section(_SECTIONS[k], v, k, getattr(cfg, k)) if k in _SECTIONS else _freeze(v)
               for k, v in overrides.items()}
    enc_override = overrides.get("encoder", {})
    if "image_size" in overrides and isinstance(enc_override, dict) and "image_size" not in enc_override:
        # The encoder only accepts its own size, so one knob sets both.
        changes["encoder"] = replace(changes.get("encoder", cfg.encoder), image_size=overrides["image_size"])
    return replace(cfg, **changes)


def build_model(name_or_config: str | ModelConfig, encoder_weights: str | Path | None = None,
                **overrides: Any) -> SharedRIS:
    """Build a Shared-RIS model (random init except the encoder when weights are given).

    Args:
        name_or_config: a registered name (see :func:`list_models`) or a :class:`ModelConfig`.
        encoder_weights: optional official BEiT-3 checkpoint (``.pth`` or ``.safetensors``) for the encoder.
        overrides: as for :func:`model_config`.
    Returns:
        the model, in training mode, on the default device.
    """
    if isinstance(name_or_config, ModelConfig):
        cfg = apply_overrides(name_or_config, **overrides)
    else:
        cfg = model_config(name_or_config, **overrides)
    encoder = BEiT3(cfg.encoder)
    if encoder_weights is not None:
        encoder.load_official_checkpoint(encoder_weights)
    return SharedRIS(
        encoder=encoder,
        fpn=SharedFPN(cfg.encoder.embed_dim, cfg.fpn, patch_size=cfg.encoder.patch_size),
        decoder=MaskDecoder(cfg.decoder, pixel_dim=cfg.fpn.output_channels),
        taps=cfg.taps,
    )
