"""Self-describing checkpoints: a folder with ``config.json``, ``model.safetensors`` and the tokenizer.

``load_pretrained`` rebuilds a model from that folder alone (``read_checkpoint`` reads its config
and weights without building one); ``"default"`` names the tiny model that ships inside the package.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import torch

from sharedris.checkpoint import atomic_write
from sharedris.modeling.registry import MODELS, ModelConfig, build_model
from sharedris.modeling.segmenter import SharedRIS

FORMAT = "sharedris"
# 2: training settings (encoder drop_path_rate, grad_checkpointing) and derived values (image_size,
# decoder width) left the model config; version-1 files are read by dropping them (_upgrade_v1).
# 3: decoder.iou_from_mask; older files predicted the IoU from the query alone (_upgrade_v2).
FORMAT_VERSION = 3
CONFIG_FILE, WEIGHTS_FILE, VOCABULARY_FILE = "config.json", "model.safetensors", "vocabulary.json"
HEADS = {"presence_head": "decoder.presence_mlp.", "iou_head": "decoder.iou_mlp."}  # config flag -> weights


class PretrainedError(ValueError):
    """A checkpoint folder that cannot be loaded; the message says why."""


def assets_dir() -> Path:
    """The package's bundled files (default model, tokenizers)."""
    return Path(str(resources.files("sharedris") / "assets"))


def resolve_tokenizer(cfg: ModelConfig, explicit: str | Path | None = None) -> Path:
    """The tokenizer file for ``cfg``: ``explicit`` if given, else the bundled one of that name."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        return path
    bundled = assets_dir() / "tokenizers" / cfg.tokenizer
    if not bundled.is_file():
        raise FileNotFoundError(f"no bundled tokenizer named {cfg.tokenizer!r}; pass the file "
                                f"(e.g. tokenizer=/path/to/{cfg.tokenizer}), the one released with BEiT-3")
    return bundled


def save_pretrained(model: SharedRIS, out_dir: str | Path, tokenizer_file: str | Path | None = None,
                    dtype: torch.dtype = torch.float32) -> Path:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer into ``out_dir``, each atomically.

    The config is ``model.config``; the tokenizer is ``tokenizer_file``, else the model's own
    (``model.tokenizer_file``), else the bundled one of ``model.config.tokenizer``.
    ``dtype=torch.float16`` halves the file (the bundled default model); :func:`load_pretrained`
    always returns fp32 weights. A model with a ``vocabulary`` (the words its training expressions
    used) also gets ``vocabulary.json``, with its ``description``.
    """
    from safetensors.torch import save_file

    cfg = model.config
    tokenizer_file = resolve_tokenizer(cfg, tokenizer_file or model.tokenizer_file)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    atomic_write(out / WEIGHTS_FILE, lambda p: save_file(state, str(p), metadata={"format": FORMAT}))
    atomic_write(out / cfg.tokenizer, lambda p: shutil.copyfile(tokenizer_file, p))
    if model.vocabulary is not None:
        vocab = {"description": model.description, "words": sorted(model.vocabulary)}
        atomic_write(out / VOCABULARY_FILE, lambda p: p.write_text(json.dumps(vocab, indent=1)))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": cfg.to_dict()}
    atomic_write(out / CONFIG_FILE, lambda p: p.write_text(json.dumps(meta, indent=2)))
    return out


def _upgrade_v1(model: dict) -> dict:
    """A format-1 model config in today's form: drop the training settings and derived copies."""
    model = {**model, "encoder": dict(model.get("encoder", {})), "decoder": dict(model.get("decoder", {}))}
    model["encoder"].pop("drop_path_rate", None)
    model["encoder"].pop("grad_checkpointing", None)
    size = model.pop("image_size", None)
    if size is not None and size != model["encoder"].get("image_size", size):
        raise ValueError(f"image_size {size} differs from encoder.image_size {model['encoder']['image_size']}")
    for flag in HEADS:  # format 1 predates the presence and IoU heads
        model["decoder"].setdefault(flag, False)
    width = model["decoder"].pop("width", None)
    if width is not None and width != model.get("fpn", {}).get("width", width):
        raise ValueError(f"decoder.width {width} differs from fpn.width {model['fpn']['width']}")
    return model


def _upgrade_v2(model: dict) -> dict:
    """A format-2 model config in today's form: its IoU head predicted the IoU itself."""
    return {**model, "decoder": {"iou_from_mask": False, **model.get("decoder", {})}}


# Registry names whose trained weights ship inside the package, and the bundled folder holding them.
BUNDLED = {"default": "default", "sharedris_tiny": "default"}


def read_checkpoint(path: str | Path = "default") -> tuple[Path, ModelConfig, dict[str, torch.Tensor]]:
    """The folder, model config and weights of a checkpoint folder (or a name in ``BUNDLED``:
    ``"default"``, or ``"sharedris_tiny"``, whose weights are the default's), without building the model.
    Those names always mean the bundled weights: a folder so named is ``./default``.

    Older formats' configs are upgraded. Whether the weights fit the config is left to the caller
    (:func:`load_pretrained` checks it against the model it builds).

    Raises:
        PretrainedError: no such folder, or a folder without a readable sharedris config and weights.
    """
    folder = assets_dir() / BUNDLED[str(path)] if str(path) in BUNDLED else Path(path)
    if not folder.exists() and str(path) in MODELS:
        raise PretrainedError(f"no weights ship for the architecture {path}: only 'default' (= sharedris_tiny) "
                              "is bundled; train "
                              f"one (sharedris train model={path} ...; `sharedris fetch weights beit3_base` gets "
                              "the BEiT-3 encoder initialisation, see docs/real-photos.md) and load its folder")
    if not folder.is_dir():
        raise PretrainedError(f"model folder {folder} does not exist (expected a folder written by "
                              "save_pretrained, or 'default')")
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise PretrainedError(f"{folder} has no {CONFIG_FILE}; it is not a sharedris checkpoint") from None
    except json.JSONDecodeError as e:
        raise PretrainedError(f"{folder / CONFIG_FILE} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PretrainedError(f"{folder / CONFIG_FILE} is not a sharedris config")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise PretrainedError(f"{folder} was written by a newer sharedris (format "
                              f"{meta['format_version']}); upgrade sharedris")
    try:
        version, model_dict = meta.get("format_version", 0), meta["model"]
        if version < 2:
            model_dict = _upgrade_v1(model_dict)
        if version < 3:
            model_dict = _upgrade_v2(model_dict)
        cfg = ModelConfig.from_dict(model_dict)
    except (KeyError, TypeError, ValueError) as e:
        raise PretrainedError(f"{folder / CONFIG_FILE} has an invalid model config ({e})") from None
    return folder, cfg, _read_weights(folder / WEIGHTS_FILE)


def load_pretrained(path: str | Path = "default", device: torch.device | str = "cpu") -> SharedRIS:
    """Rebuild a model from a checkpoint folder (or ``"default"`` / ``"sharedris_tiny"``), in eval mode.

    The returned model carries ``config`` (its :class:`ModelConfig`) and ``tokenizer_file`` (the
    folder's tokenizer). The model is built without memory (on the meta device) and takes the file's
    tensors as its weights, in fp32: no random initialisation and no second copy of the model.
    """
    folder, cfg, state = read_checkpoint(path)
    with torch.device("meta"):
        model = build_model(cfg)
    expected = model.state_dict()
    mismatched = sorted(k for k in expected if k not in state or state[k].shape != expected[k].shape)
    unexpected = sorted(set(state) - set(expected))
    head_weights = [k for k in mismatched if k.startswith(tuple(HEADS.values())) and k not in state]
    if head_weights and len(head_weights) == len(mismatched) and not unexpected:
        missing_heads = [f for f, prefix in HEADS.items() if any(k.startswith(prefix) for k in head_weights)]
        raise PretrainedError(f"{folder / WEIGHTS_FILE} has no weights for the {' and '.join(missing_heads)} that "
                              f"{CONFIG_FILE} asks for (it was saved before the model had them); set "
                              f"{', '.join('decoder.' + f for f in missing_heads)} to false in {CONFIG_FILE} to "
                              "load it without them, or retrain it")
    if mismatched or unexpected:
        names = (mismatched + unexpected)[:3]
        raise PretrainedError(f"{folder / WEIGHTS_FILE} does not fit the architecture in {CONFIG_FILE} "
                              f"(e.g. {names}); the weights belong to another model")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, assign=True)
    model.requires_grad_(True)  # as a freshly built model: the assigned tensors came without gradients
    model.tokenizer_file = folder / cfg.tokenizer
    model.vocabulary, model.description = _read_vocabulary(folder)
    if not model.tokenizer_file.is_file():
        raise PretrainedError(f"{folder} lacks its tokenizer file {cfg.tokenizer}")
    return model.to(device).eval()


def _read_vocabulary(folder: Path) -> tuple[frozenset[str] | None, str | None]:
    """The words of ``folder/vocabulary.json`` and its description; (None, None) without the file."""
    path = folder / VOCABULARY_FILE
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text())
        words = frozenset(str(w).lower() for w in data["words"])
        description = data.get("description")
    except (ValueError, KeyError, TypeError) as e:
        raise PretrainedError(f"{path} is not a vocabulary file ({e}); it needs {{\"words\": [...]}}") from None
    return words, None if description is None else str(description)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise PretrainedError(f"{path.parent} has no {WEIGHTS_FILE}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise PretrainedError(f"{path} is not a readable safetensors file ({e})") from None
