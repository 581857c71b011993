"""A preset as a complete params file, for ``dvc repro``.

A preset (configs/<name>.yaml) holds only what differs from params.yaml; ``load_params(preset=)``
fills in the rest from the code defaults, which equal params.yaml's. DVC reads one params file and
needs every key dvc.yaml lists in it, so for ``dvc repro`` a preset is written out whole:
``python -m pipeline.presets cityscapes > params.yaml`` (``make params PRESET=cityscapes``) gives
the defaults with the preset over them, every section and key.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import yaml

from pipeline.config import Params, load_params
from pipeline.errors import ConfigError
from pipeline.paramsfile import PRESETS_DIR, preset_path


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively: what YAML's safe dumper writes."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def params_yaml(params: Params) -> str:
    """Every param: the sections in params.yaml's order, each one's keys in its dataclass's."""
    return "\n".join(
        yaml.safe_dump(
            {f.name: _plain(dataclasses.asdict(getattr(params, f.name)))},
            sort_keys=False,
            default_flow_style=None,  # lists of numbers on one line, mappings in blocks
            width=100,
        )
        for f in dataclasses.fields(params)
    )


def preset_params_yaml(name: str) -> str:
    """The complete params file of a preset: a line saying where it comes from, the preset's
    header (its reference), then every param."""
    path = preset_path(name)
    header = path.read_text(encoding="utf-8").split("\n\n", 1)[0]
    source = f"configs/{path.name}" if path.resolve().parent == PRESETS_DIR else str(path)
    intro = (
        f"# Written by `python -m pipeline.presets {name}`: {source} over the code defaults.\n"
        "# Edit the preset and write this file again; `git checkout params.yaml` is the demo.\n"
    )
    return f"{intro}{header}\n\n{params_yaml(load_params(preset=name))}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m pipeline.presets NAME > params.yaml", file=sys.stderr)
        return 2
    try:
        text = preset_params_yaml(args[0])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
