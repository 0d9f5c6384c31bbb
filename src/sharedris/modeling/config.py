""":class:`ModelConfig`: the architecture of one Shared-RIS model and the preprocessing its weights expect.

A checkpoint that stores ``ModelConfig.to_dict()`` describes itself. Values derived from others
(the input size, the decoder's width) are properties, never stored twice. Training-only settings
(drop-path rate, gradient checkpointing) are not part of it: they are arguments of
:func:`sharedris.build_model` and methods of the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sharedris.config import from_dict, merge, to_dict
from sharedris.modeling.beit3 import POSITION_OFFSET, BEiT3Config
from sharedris.modeling.decoder import DecoderConfig
from sharedris.modeling.fpn import FPNConfig


@dataclass(frozen=True)
class ModelConfig:
    """Architecture plus preprocessing of one Shared-RIS model.

    Args:
        encoder, fpn, decoder: sub-module hyper-parameters (the decoder's tokens are ``fpn.width`` wide).
        taps: four encoder blocks (1-based) feeding the FPN, shallow to deep.
        text_len: token length L that texts are padded/truncated to.
        tokenizer: file name of the SentencePiece model shipped with the weights.
        mean, std: per-channel pixel normalization applied after scaling to [0, 1].
    """

    encoder: BEiT3Config
    fpn: FPNConfig
    decoder: DecoderConfig
    taps: tuple[int, ...]
    text_len: int
    tokenizer: str
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        enc = self.encoder
        if len(self.taps) != 4 or not all(1 <= t <= enc.depth for t in self.taps):
            raise ValueError(f"taps {self.taps} must be 4 block numbers in 1..{enc.depth} (encoder.depth)")
        if self.text_len > enc.max_text_positions - POSITION_OFFSET:
            raise ValueError(f"text_len {self.text_len} exceeds the encoder's text positions "
                             f"({enc.max_text_positions - POSITION_OFFSET}); raise encoder.max_text_positions")
        if not len(self.mean) == len(self.std) == enc.in_chans:
            raise ValueError(f"mean and std need {enc.in_chans} values (one per input channel)")

    @property
    def image_size(self) -> int:
        """Square input size in pixels (the encoder's)."""
        return self.encoder.image_size

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples as lists); :meth:`from_dict` inverts it exactly."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Rebuild a config from :meth:`to_dict` output (or its JSON round trip).

        Unknown keys are errors; keys missing from a sub-config take that sub-config's defaults,
        so checkpoints written before a field existed still load.
        """
        return from_dict(cls, d)

    def replace(self, **overrides: Any) -> "ModelConfig":
        """A copy with overrides applied; sub-configs take dicts of their fields or whole instances.

        ``image_size`` is accepted as a shortcut for ``encoder={"image_size": ...}``.
        """
        if "image_size" in overrides:
            overrides = dict(overrides)
            size = overrides.pop("image_size")
            encoder = overrides.get("encoder", {})
            if not isinstance(encoder, dict):
                raise ValueError("give image_size inside the encoder config when passing a whole BEiT3Config")
            overrides["encoder"] = {**encoder, "image_size": size}
        return merge(self, overrides)
