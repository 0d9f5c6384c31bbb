"""Typed configuration machinery: dataclass defaults, YAML delta files, ``a.b=c`` overrides.

The one way configs are built and changed: :func:`merge` applies a delta to a dataclass,
:func:`from_dict` builds one from a plain dict (missing keys take their defaults), :func:`to_dict`
inverts both. The dataclasses themselves live with what they configure (``ModelConfig`` in
:mod:`sharedris.modeling.config`, ``DataConfig`` in :mod:`sharedris.data.config`, ``TrainConfig`` in
:mod:`sharedris.train.config`). Unknown keys are errors everywhere (a typo must never silently
train the wrong experiment).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration the user wrote that cannot be applied; the message names the key."""


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
    """A copy of dataclass ``cfg`` with ``delta`` applied recursively; unknown keys raise ConfigError.

    A nested dataclass field takes a mapping of its own fields (merged over its current value) or
    a whole instance of its type.
    """
    if not isinstance(delta, Mapping):
        raise ConfigError(f"{where.rstrip('.') or 'config'} must be a mapping, got {type(delta).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    changes = {}
    for key, value in delta.items():
        path = f"{where}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {path!r}; valid keys here: {', '.join(fields)}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            changes[key] = value if isinstance(value, type(current)) else merge(current, value, where=f"{path}.")
        else:
            changes[key] = _coerce(value, hints[key], path)
    try:
        return dataclasses.replace(cfg, **changes)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a dataclass's own check (__post_init__) refused the values
        raise ConfigError(str(e)) from None


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a plain dict (e.g. :func:`to_dict` output read back from JSON).

    Keys missing from ``data`` take the field's default, so files written before a field existed
    still load; a missing field without a default and an unknown key are ConfigErrors.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[where + k for k in unknown]}; valid keys here: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        path = f"{where}{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"config lacks {path!r}")
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = data[name]
            values[name] = value if isinstance(value, hint) else from_dict(hint, value, where=f"{path}.")
        else:
            values[name] = _coerce(data[name], hint, path)
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


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




def load_delta(path: str | Path | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The delta of the YAML file at ``path`` (if any) with ``key=value`` overrides on top."""
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
    return _deep_update(delta, parse_overrides(overrides))
