"""Typed stage configs from YAML values: convert each value to its field's annotated type, refuse unknown keys
and wrong types with the key's name (``coerce``, ``build_config``), and list a config's keys with their types,
defaults and help (``describe_config``, for ``embedforge recipes explain``). Import-light: no torch here.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import types
import typing
from pathlib import Path
from typing import Any

from embedforge.configs import ConfigError, choice

# Every decimal spelling of a number: 2e-4, 1E-3, .5, 5., 1e+12, -3, 1_000.5 (not nan, inf or words).
_FLOAT = re.compile(r"[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Union:  # typing.Union[...] (a named alias such as LayerSpec) reads like A | B
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__name__
    return str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type ``tp`` or raise :class:`ConfigError` naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}", key=key)
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: expected one of {', '.join(map(repr, args))}, got {value!r}", key=key)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}", key=key)
        item = args[0] if args else Any
        items = [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}", key=key)
        vt = args[1] if len(args) == 2 else Any
        return {str(k): coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return choice(tp, value, key)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}", key=key)
        return build_config(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}", key=key)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}", key=key)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value.strip().replace("_", ""))  # YAML 1.1 reads 2e-4 (no dot) as text
        raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}", key=key)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected text, got {type(value).__name__} {value!r}", key=key)
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{key}: expected a path, got {value!r}", key=key)
    return value


def build_config(cls: type, values: dict[str, Any], *, prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from ``values``: unknown keys, wrong types and missing fields are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            from embedforge.backbone import old_key_hint
            from embedforge.training.options import moved_train_key

            moved = old_key_hint(key, value) if "layers" in fields else None
            moved = moved or (moved_train_key(key, value) if "train" in fields else None)
            renamed = getattr(cls, "RENAMED_KEYS", {}).get(key)  # a config's own retired key names: old -> new
            moved = moved or (f"renamed; write {renamed}: {_yaml_value(value)}" if renamed else None)
            if moved:
                raise ConfigError(f"{full}: {moved}", key=full)
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{full}: unknown key for {cls.__name__}{hint}; valid keys: {', '.join(fields)}",
                              key=full)
        default = _default_of(fields[key])
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            # a nested options mapping changes only the keys it names; the others keep this stage's defaults
            value = {**{f.name: getattr(default, f.name) for f in dataclasses.fields(default) if f.init}, **value}
        kwargs[key] = coerce(value, hints[key], full)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            full = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"{full}: required key is missing", key=full)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if prefix and exc.key and not exc.key.startswith(prefix):
            raise ConfigError(f"{prefix}.{exc}", key=f"{prefix}.{exc.key}") from None
        raise


def _yaml_value(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _default_of(f: dataclasses.Field) -> Any:
    """A field's default value (a fresh one from its factory), or ``dataclasses.MISSING``."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _shown(value: Any) -> str:
    return repr(value.value if isinstance(value, enum.Enum) else value)


def describe_config(cls: type) -> list[dict[str, str]]:
    """Field name, type, default and help of a stage config (for ``embedforge recipes explain``); the keys of a
    nested options mapping (``train``) are listed as ``train.KEY`` with this stage's defaults."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = _default_of(f)
        if dataclasses.is_dataclass(default):
            sub_hints = typing.get_type_hints(type(default))
            for sub in dataclasses.fields(default):
                rows.append({"key": f"{f.name}.{sub.name}", "type": _type_name(sub_hints[sub.name]),
                             "default": _shown(getattr(default, sub.name)), "help": sub.metadata.get("help", "")})
            continue
        rows.append({"key": f.name, "type": _type_name(hints[f.name]),
                     "default": "(required)" if default is dataclasses.MISSING else _shown(default),
                     "help": f.metadata.get("help", "")})
    return rows
