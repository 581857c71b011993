"""A params file as a raw mapping: YAML read with one-line errors, presets found by name,
``--set section.key=value`` overrides applied. pipeline/config.py builds the typed sections."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from pipeline.errors import ConfigError

PRESETS_DIR = Path(__file__).resolve().parents[1] / "configs"


# A params file holds hundreds of values; an alias bomb (601 bytes of nested anchors) billions.
MAX_VALUES = 100_000
MAX_DEPTH = 64


class Refused(yaml.YAMLError):
    """YAML that parses but is refused as params: an alias bomb, nesting too deep, a key
    given twice. Its text is the problem; the reader prefixes the file or ``--set``."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, with YAML 1.2's floats: ``1e-6`` and ``1E+3`` are numbers (YAML
    1.1 wants a dot and a signed exponent, so PyYAML reads them as strings, and a JSON params
    file's ``1e-06`` would be refused as "not a number").

    Bounded while it composes: aliases may not expand the document past ``MAX_VALUES`` values
    (each alias counts the values it stands for, so a billion laughs stops after a few hundred
    events), nor refer to the collection they are in, and collections nest at most
    ``MAX_DEPTH`` deep. A mapping's key given twice is refused (YAML forbids it; PyYAML keeps
    the last), naming its dotted path; keys merged in with ``<<`` may be overridden.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._values = 0  # the document's values so far, aliases expanded
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> its values, aliases expanded

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if (size := self._sizes.get(id(node))) is None:
                raise Refused(f"line {line}: alias *{event.anchor} refers to the value it is in")
            self._count(size, line)
            return node
        if self._depth >= MAX_DEPTH:
            raise Refused(f"line {line}: values nest more than {MAX_DEPTH} deep")
        before = self._values
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._count(1, line)
        self._sizes[id(node)] = self._values - before
        return node

    def _count(self, values: int, line: int) -> None:
        self._values += values
        if self._values > MAX_VALUES:
            raise Refused(
                f"line {line}: its aliases expand to more than {MAX_VALUES:,} values (an alias "
                "bomb?): write the values out"
            )

    def get_single_node(self) -> Node | None:
        node = super().get_single_node()
        if node is not None:
            self._refuse_duplicates(node, "", set())
        return node

    def _refuse_duplicates(self, node: Node, path: str, seen: set[int]) -> None:
        """Each mapping (each once, however many aliases name it): no key given twice."""
        if id(node) in seen or not isinstance(node, MappingNode | SequenceNode):
            return
        seen.add(id(node))
        if isinstance(node, SequenceNode):
            for i, item in enumerate(node.value):
                self._refuse_duplicates(item, f"{path}[{i}]", seen)
            return
        lines: dict[Any, int] = {}
        for key, value in node.value:
            if key.tag == "tag:yaml.org,2002:merge" or not isinstance(key, ScalarNode):
                continue
            name = self.construct_object(key)
            dotted = f"{path}.{name}" if path else str(name)
            line = key.start_mark.line + 1
            if name in lines:
                raise Refused(f"{dotted} is given twice (lines {lines[name]} and {line}): keep one")
            lines[name] = line
            self._refuse_duplicates(value, dotted, seen)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """YAML text -> Python values, safely (no object tags), with YAML 1.2's floats; aliases,
    nesting and duplicate keys bounded as ``_Loader`` says (``Refused``)."""
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: params file does not exist")
    try:
        data = load_yaml(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not UTF-8 text (byte {err.start}): save it as UTF-8") from None
    except Refused as err:
        raise ConfigError(f"{p}: {err}") from None
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
    except Refused as err:
        raise ConfigError(f"--set {assignment}: {err}") from None
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
