"""Shared-RIS model: BEiT-3 encoder, Shared FPN, Shared Mask Decoder, and the config registry."""

from sharedris.modeling.beit3 import BEiT3, BEiT3Config
from sharedris.modeling.config import ModelConfig
from sharedris.modeling.decoder import DecoderConfig, MaskDecoder
from sharedris.modeling.fpn import FPNConfig, FPNOutput, SharedFPN
from sharedris.modeling.registry import build_model, list_models, model_config
from sharedris.modeling.segmenter import SegmenterOutput, SharedRIS

__all__ = [
    "BEiT3", "BEiT3Config", "DecoderConfig", "FPNConfig", "FPNOutput", "MaskDecoder", "ModelConfig",
    "SegmenterOutput", "SharedFPN", "SharedRIS", "build_model", "list_models", "model_config",
]
