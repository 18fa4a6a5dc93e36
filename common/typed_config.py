"""YAML -> frozen dataclasses, checked at load: the one config loader every job uses.

Each package declares its own dataclasses (field docstrings are the reference) and its own
cross-field rules; this module only turns plain data into those dataclasses. Every error is a
:class:`ConfigError` whose message starts with the dotted field (``thresholds.entropy.min_entrpy:
unknown field (did you mean 'thresholds.entropy.min_entropy'?)``), raised before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config value or CLI flag; the message names the field or flag."""


def read_yaml(path: str | Path, flag: str = "--config") -> dict:
    """The mapping in a YAML file; a missing file, bad YAML or a non-mapping names ``flag``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{flag}: no such file: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{flag}: {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{flag}: {p} must hold a mapping of config fields, got {type(data).__name__}")
    return data


def parse_assignment(item: str, flag: str = "--set") -> tuple[str, Any]:
    """``optim.lr=3e-4`` -> ("optim.lr", 3e-4); the value is parsed as YAML (numbers, lists, bools)."""
    if "=" not in item:
        raise ConfigError(f"{flag}: expected KEY=VALUE, got '{item}'")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """data["a"]["b"] = value for ``a.b``, creating the intermediate mappings."""
    *parents, leaf = dotted.split(".")
    node = data
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(parents[:i + 1])}: is not a mapping, cannot set {dotted}")
    node[leaf] = value


def build(cls: type, data: object, path: str = ""):
    """An instance of dataclass ``cls`` from ``data``: unknown keys (with a did-you-mean), missing
    required fields and wrong types are errors naming the dotted field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    prefix = f"{path}." if path else ""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    for key in data:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{near[0]}'?)" if near else f" (known: {', '.join(names)})"
            raise ConfigError(f"{prefix}{key}: unknown field{hint}")
    for f in fields:
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in data:
            raise ConfigError(f"{prefix}{f.name}: required field is missing")
    return cls(**{k: _coerce(hints[k], v, prefix + k) for k, v in data.items()})


def _fail(path: str, what: str, value: object) -> typing.NoReturn:
    raise ConfigError(f"{path}: expected {what}, got {value!r}")


def _coerce(tp: Any, value: object, path: str):
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) not in args:
                _fail(path, "a value", value)
            return None
        (tp,) = [a for a in args if a is not type(None)]
        return _coerce(tp, value, path)
    if origin is dict:
        kt, vt = args
        if not isinstance(value, dict):
            _fail(path, "a mapping", value)
        return {_coerce(kt, k, f"{path}.{k}"): _coerce(vt, v, f"{path}.{k}") for k, v in value.items()}
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any length
        if not isinstance(value, list | tuple):
            _fail(path, "a list", value)
        return tuple(_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            _fail(path, f"a list of {len(args)}", value)
        return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if tp is bool:
        if not isinstance(value, bool):
            _fail(path, "true/false", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, "an integer", value)
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "3e-4" (no dot) as a string: accept plain numerals
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            _fail(path, "a number", value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(path, "a string", value)
        return value
    raise TypeError(f"{path}: unsupported config type {tp}")  # a bug in the dataclass, not the input
