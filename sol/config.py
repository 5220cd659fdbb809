"""Typed configs loaded from YAML with strict keys: an unknown key is an error naming it (no silent typos)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path

import yaml

from sol.errors import SolError


def from_dict(cls, data: dict, where: str = "config"):
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise :class:`SolError`."""
    if not isinstance(data, dict):
        raise SolError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SolError(f"unknown {where} key '{unknown[0]}' (known keys: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    data = {k: _float_text(v) if _is(1.5, hints[k]) else v for k, v in data.items()}
    for key, value in data.items():
        if not _is(value, hints[key]):
            raise SolError(f"{where} key '{key}' must be {_name(hints[key])}, got {value!r}")
    try:
        return cls(**data)
    except TypeError as e:
        raise SolError(f"bad {where}: {e}") from None


def _float_text(value):
    """YAML 1.1 reads 3e-4 (no dot) as a string: accept numeric text where a number is expected."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _is(value, hint) -> bool:
    """Whether a YAML value fits a field's type (an int is a float; a bool is not a number; lists fit tuples)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_is(v, a) for v, a in zip(value, args))
        return not args or all(_is(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and (not args or all(_is(v, args[1]) for v in value.values()))
    return isinstance(value, origin or hint)


def _name(hint) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        hint, str(hint).replace("typing.", ""))


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SolError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SolError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return data


def config_hash(obj) -> str:
    d = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]
