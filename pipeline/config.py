"""params.yaml -> frozen, validated dataclasses; one section per stage.

Each section class checks its own values in ``__post_init__`` and raises ``ConfigError`` with a
message that names the param (``shard.max_count must be >= 1, got 0``). ``load_section`` rejects
unknown keys, so a typo in params.yaml is an error, not a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """An invalid or missing param; the message names it."""


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: params file does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: must be a mapping of sections")
    return data


def from_mapping(cls: type[T], values: Mapping[str, Any], section: str) -> T:
    """Build a section dataclass, converting lists to tuples and naming any bad key."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{section} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"{section}.{unknown[0]} is not a known param; known: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(value, hints[name], f"{section}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{section}: {err}") from None


def _coerce(value: Any, hint: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], name) if len(non_none) == 1 else value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, name) for v in value)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and not isinstance(value, hint):
        raise ConfigError(f"{name} must be {hint.__name__}, got {value!r}")
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"{name} must be int, got {value!r}")
    return value


def load_section(cls: type[T], name: str, path: str | Path = "params.yaml") -> T:
    params = read_params(path)
    return from_mapping(cls, params.get(name, {}), name)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class SyntheticParams:
    """The embedded synthetic dataset (pipeline/datasets/synthetic.py)."""

    num_samples: dict[str, int] = field(default_factory=lambda: {"train": 200, "val": 50})
    width: int = 160
    height: int = 120
    seed: int = 0

    def __post_init__(self) -> None:
        _check(bool(self.num_samples), "synthetic.num_samples must name at least one split")
        for split, n in self.num_samples.items():
            _check(
                isinstance(n, int) and n >= 1,
                f"synthetic.num_samples.{split} must be >= 1, got {n}",
            )
        _check(self.width >= 32 and self.height >= 32, "synthetic.width and height must be >= 32")


@dataclass(frozen=True)
class ShardParams:
    """Raw dataset -> WebDataset shards (pipeline/shard.py)."""

    dataset: str = "synthetic"
    root: str = ""
    out: str = "data/shards"
    splits: tuple[str, ...] = ("train", "val")
    max_count: int = 100
    max_size_mb: float = 256.0
    image_format: str = "original"
    jpeg_quality: int = 95
    workers: int = 2
    on_error: str = "fail"

    def __post_init__(self) -> None:
        _check(bool(self.splits), "shard.splits must name at least one split")
        _check(self.max_count >= 1, f"shard.max_count must be >= 1, got {self.max_count}")
        _check(self.max_size_mb > 0, f"shard.max_size_mb must be > 0, got {self.max_size_mb}")
        _check(
            self.image_format in ("original", "jpg"),
            f"shard.image_format must be 'original' or 'jpg', got {self.image_format!r}",
        )
        _check(
            1 <= self.jpeg_quality <= 100,
            f"shard.jpeg_quality must be 1..100, got {self.jpeg_quality}",
        )
        _check(self.workers >= 1, f"shard.workers must be >= 1, got {self.workers}")
        _check(
            self.on_error in ("fail", "skip"),
            f"shard.on_error must be fail or skip, got {self.on_error!r}",
        )
