"""Typed configuration: dataclass defaults, YAML delta files, ``a.b=c`` command-line overrides.

Unknown keys are errors everywhere (a typo must never silently train the wrong experiment).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

from sharedris.data.synthetic import FAMILIES

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration the user wrote that cannot be applied; the message names the key."""


@dataclass
class DataConfig:
    dataset: str = "synthetic"  # synthetic | refcoco | refcoco+ | refcocog
    root: str | None = None  # refer-format root; falls back to $SHAREDRIS_DATA
    split_by: str | None = None  # unc / umd / google; None = the dataset's usual one
    train_split: str = "train"
    val_split: str = "val"  # selection never uses a test split
    text_field: str = "raw"  # refer sentences: "raw" (typed text, what LAVT feeds) or "sent"
    synthetic_image_size: int = 128
    synthetic_train_size: int = 20000
    synthetic_eval_size: int = 1000  # per evaluation split
    # Training scenes only (evaluation always draws every family alike): each scene's family is drawn
    # uniformly from this list, so a family listed twice is drawn twice as often.
    synthetic_train_families: tuple[str, ...] = FAMILIES
    synthetic_fresh_epochs: bool = False  # each epoch new training scenes (e*N..e*N+N-1) instead of the same N
    seed: int = 0
    shuffle_texts: bool = False  # control experiment: texts permuted across samples
    num_workers: int = 2


@dataclass
class OptimConfig:
    lr: float = 5e-5  # encoder learning rate
    new_module_lr_mult: float = 10.0  # FPN, decoder (and a stem trained from scratch) learn faster
    weight_decay: float = 0.01
    layer_decay: float = 1.0  # layer-wise lr decay for the encoder; 1.0 = off
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 1.0  # max global grad norm; 0 = off
    warmup_epochs: float = 1.0
    poly_power: float = 0.9


@dataclass
class LossConfig:
    bce_weight: float = 2.0
    dice_weight: float = 0.5


@dataclass
class StemPretrainConfig:
    """A short stage before the referring loss: the image stem alone learns the objects' categories.

    Measured on sharedris_tiny (docs/training.md): trained from scratch, the referring loss alone
    never makes the stem encode shape; a few hundred steps of this stage do. Fresh runs only.
    """

    steps: int = 0  # 0 = off
    scenes_per_step: int = 16
    lr: float = 1e-3


@dataclass
class TrainConfig:
    model: str = "sharedris_tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # passed to build_model
    encoder_weights: str | None = None  # official BEiT-3 file to initialise the encoder from
    tokenizer: str | None = None  # SentencePiece file; None = the one bundled for the model
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    stem_pretrain: StemPretrainConfig = field(default_factory=StemPretrainConfig)
    epochs: int = 40
    batch_size: int = 32  # global batch (all ranks, after accumulation)
    grad_accum: int = 1
    amp: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | none
    drop_path: float = 0.1
    grad_checkpointing: bool = False
    seed: int = 0
    out_dir: str = "runs/default"
    eval_every: int = 1  # epochs
    checkpoint_every: int = 500  # steps, besides every epoch end
    log_every: int = 20  # steps


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON/YAML-friendly dict of a config dataclass (tuples become lists)."""
    return _plain(dataclasses.asdict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def merge(cfg: T, delta: Mapping[str, Any], where: str = "") -> T:
    """A copy of dataclass ``cfg`` with ``delta`` applied recursively; unknown keys raise ConfigError."""
    if not isinstance(delta, Mapping):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(delta).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    changes = {}
    for key, value in delta.items():
        path = f"{where}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {path!r}; valid keys here: {', '.join(fields)}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            changes[key] = merge(current, value, where=f"{path}.")
        else:
            changes[key] = _coerce(value, hints[key], path)
    return dataclasses.replace(cfg, **changes)


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Check ``value`` against a field's type hint, converting the few safe cases (int->float, list->tuple)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{path} must be a float, got {value!r}") from None
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value) if isinstance(value, (list, tuple)) else ()
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, h, f"{path}[{i}]") for i, (v, h) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return value
    if isinstance(hint, type) and (not isinstance(value, hint) or (hint is not bool and isinstance(value, bool))):
        raise ConfigError(f"{path} must be a {hint.__name__}, got {value!r}")
    return value


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["optim.lr=1e-4", "epochs=3"]`` -> ``{"optim": {"lr": 1e-4}, "epochs": 3}`` (values read as YAML)."""
    delta: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = delta
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {p!r}")
        node[leaf] = value
    return delta


def _deep_update(base: dict[str, Any], delta: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in delta.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def load_train_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults, then the YAML delta file at ``path`` (if any), then ``key=value`` overrides."""
    delta: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            delta = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML ({e})") from None
        if not isinstance(delta, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys")
    delta = _deep_update(delta, parse_overrides(overrides))
    return merge(TrainConfig(), delta)
