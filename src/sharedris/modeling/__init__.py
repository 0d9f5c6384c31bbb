"""Shared-RIS model: BEiT-3 encoder, Shared FPN, Shared Mask Decoder, and the config registry."""

from sharedris.modeling.beit3 import BEiT3, BEiT3Config
from sharedris.modeling.decoder import DecoderConfig, MaskDecoder
from sharedris.modeling.fpn import FPNConfig, FPNOutput, SharedFPN
from sharedris.modeling.registry import ModelConfig, build_model, list_models, model_config
from sharedris.modeling.segmenter import SharedRIS

__all__ = [
    "BEiT3", "BEiT3Config", "DecoderConfig", "FPNConfig", "FPNOutput", "MaskDecoder", "ModelConfig",
    "SharedFPN", "SharedRIS", "build_model", "list_models", "model_config",
]
