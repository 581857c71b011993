"""A params file as a raw mapping: YAML read with one-line errors, presets found by name,
``--set section.key=value`` overrides applied. pipeline/config.py builds the typed sections."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError

PRESETS_DIR = Path(__file__).resolve().parents[1] / "configs"


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, with YAML 1.2's floats: ``1e-6`` and ``1E+3`` are numbers (YAML
    1.1 wants a dot and a signed exponent, so PyYAML reads them as strings, and a JSON params
    file's ``1e-06`` would be refused as "not a number")."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """YAML text -> Python values, safely (no object tags), with YAML 1.2's floats."""
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: params file does not exist")
    try:
        data = load_yaml(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: must be a mapping of sections")
    return data


def preset_path(name: str) -> Path:
    """A preset by name (configs/<name>.yaml) or by path."""
    if Path(name).is_file():
        return Path(name)
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
        raise ConfigError(f"--preset {name}: no such preset; known: {known}")
    return path


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """``section.key[.subkey]=value`` (value parsed as YAML) into the raw params mapping."""
    key, sep, text = assignment.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {assignment}: expected section.key=value, e.g. train.lr=0.005")
    try:
        value = load_yaml(text)
    except yaml.YAMLError:
        raise ConfigError(f"--set {assignment}: the value is not valid YAML") from None
    set_key(raw, key.strip(), value, f"--set {assignment}")


def set_key(raw: dict[str, Any], key: str, value: Any, where: str) -> None:
    """``raw[section][key]...`` = ``value`` for a dotted ``key``, creating mappings on the way."""
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {part} is not a mapping")
        node = child
    node[parts[-1]] = value
