"""sharedris: single-encoder referring image segmentation (Shared-RIS) on BEiT-3."""

__version__ = "0.1.0"
