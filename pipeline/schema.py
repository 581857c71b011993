"""Typed, validated params sections: the base class, the field rules, the YAML-to-type coercion.

A section is a frozen dataclass deriving from ``Section``; each field declares its default and
its rules with ``param(default, ge=..., choices=...)``. Building one, from a params file or in
code, coerces YAML values to the annotated types and checks every rule, naming the key:
``train.loss_weights.out must be a number, got 'heavy'``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import field
from functools import cache
from typing import Any, ClassVar

from pipeline.errors import ConfigError
from pipeline.locations import check_name

# Bounds of sizes (pixels), scales, seeds and search sizes: a value past them is a typo or an
# attack, and would exhaust memory or time before the first result (a 16384-pixel side at 3
# channels in fp32 is 3 GiB).
MAX_SIDE = 16384  # an image side, a resize target
MAX_CROP = 4096  # a training crop, a sliding window
MAX_SCALE = 8.0  # a resize factor
MAX_SEED = 2**32 - 1  # numpy's legacy seeding takes no more
MAX_TRIALS = 100_000  # a search's samples
# what predict and evaluate may spend on one image before they start: its forward passes cover
# it at most WORK_PER_PIXEL times (the paper's Cityscapes protocol: 95; at least MIN_WORK pixels:
# a small image in one large window), in at most MAX_PASSES passes (Cityscapes: 190)
WORK_PER_PIXEL, MIN_WORK, MAX_PASSES = 256, 2**20, 1024


def check_names(value: Any, key: str) -> None:
    """``check_name`` for a non-empty name, each item of a list of names (``shard.splits[0]``)
    and each key of a mapping keyed by name (``synthetic.num_samples``)."""
    if isinstance(value, str):
        if value:
            check_name(value, key)
    elif isinstance(value, tuple):
        for i, item in enumerate(value):
            check_name(item, f"{key}[{i}]")
    else:
        for name in value:
            check_name(name, key)


def param(default: Any, **rules: Any) -> Any:
    """A field with its default and rules: ge, gt, le, lt (numbers), choices, keys (mapping keys),
    name (what becomes a path is one plain path segment, ``check_names``: a non-empty string,
    each item of a list, each key of a mapping)."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=rules)
    return field(default=default, metadata=rules)


class Section:
    """Base of every params section: coerces YAML values to the annotated types, checks rules."""

    NAME: ClassVar[str] = ""
    KNOWN: ClassVar[dict[str, type[Section]]] = {}  # every section by NAME (pipeline/sections/)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.NAME:
            Section.KNOWN[cls.NAME] = cls

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            key = f"{self.NAME}.{f.name}"
            value = _coerce(getattr(self, f.name), hints(type(self))[f.name], key)  # type: ignore[arg-type]
            object.__setattr__(self, f.name, value)
            _check_rules(value, f.metadata, key)
        self.check()

    def check(self) -> None:
        """Rules across fields; raise ConfigError."""


@cache
def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(hint: Any) -> str:
    return {float: "a number", int: "an integer", bool: "true or false", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value) if abs(value) < 2**1000 else math.inf  # an int past a float
            if not math.isfinite(number):  # .inf, .nan
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            return number
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if hint in (int, str, bool) and (type(value) is not hint):
        raise ConfigError(f"{key} must be {_type_name(hint)}, got {value!r}")
    if hint is str:
        _check_text(value, key)
    return value


def _check_text(value: str, key: str) -> None:
    """A string param becomes a path, a URL or a name: no NUL character (no file system takes
    one) and no lone surrogate (it has no bytes to name a file with)."""
    if "\x00" in value:
        raise ConfigError(f"{key} holds a NUL character: {value!r} names no file")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{key} is not valid text (a lone surrogate): {value!r}") from None


def _check_rules(value: Any, rules: Mapping[str, Any], key: str) -> None:
    if value is None:
        return
    if rules.get("name"):
        check_names(value, key)
    if "keys" in rules and (unknown := sorted(set(value) - set(rules["keys"]), key=str)):
        raise ConfigError(f"{key}.{unknown[0]} is not known; use {', '.join(rules['keys'])}")
    if isinstance(value, dict):
        items = [(f"{key}.{k}", v) for k, v in value.items()]
    elif isinstance(value, tuple):
        items = [(f"{key}[{i}]", v) for i, v in enumerate(value)]
    else:
        items = [(key, value)]
    for name, v in items:
        if "choices" in rules and v not in rules["choices"]:
            choices = " | ".join(str(c) for c in rules["choices"])
            raise ConfigError(f"{name} must be one of {choices}, got {v!r}")
        for rule, test, word in _BOUNDS:
            if rule in rules and not test(v, rules[rule]):
                raise ConfigError(f"{name} must be {word} {rules[rule]}, got {v}")


_BOUNDS = (
    ("ge", lambda v, b: v >= b, ">="),
    ("gt", lambda v, b: v > b, ">"),
    ("le", lambda v, b: v <= b, "<="),
    ("lt", lambda v, b: v < b, "<"),
)


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
