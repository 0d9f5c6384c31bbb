"""sharedris: single-encoder referring image segmentation (Shared-RIS) on BEiT-3.

    import sharedris
    model = sharedris.load_pretrained("default")
    out = sharedris.Predictor(model).predict("photo.jpg", ["the red circle"])
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Public names, imported on first use so that `import sharedris` stays cheap (no torch import).
_EXPORTS = {
    "build_model": "sharedris.modeling.registry",
    "list_models": "sharedris.modeling.registry",
    "model_config": "sharedris.modeling.registry",
    "load_pretrained": "sharedris.modeling.pretrained",
    "save_pretrained": "sharedris.modeling.pretrained",
    "Predictor": "sharedris.predictor",
    "Prediction": "sharedris.predictor",
    "predict_manifest": "sharedris.bulk",
}
__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sharedris' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's own names plus the public ones that are imported on first use."""
    return sorted(set(globals()) | set(__all__))
