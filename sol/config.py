"""Typed configs loaded from YAML with strict keys: an unknown key is an error naming it (no silent typos)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
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
    try:
        return cls(**data)
    except TypeError as e:
        raise SolError(f"bad {where}: {e}") from None


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
