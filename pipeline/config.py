"""params.yaml -> one ``Params`` root of frozen, validated dataclasses, a section per stage.

Every command loads its params the same way: ``load_params(path, overrides, preset)`` reads a
params file (or a preset from configs/ by name), applies dotted ``--set key=value`` overrides (the
keys ``dvc exp run -S`` takes) and builds the sections. The code defaults equal params.yaml's
(a test compares them), so a params file may leave a key out. An unknown key, a wrong type or a
bad value is a ``ConfigError`` naming the key: ``train.loss_weights.out must be a number, got
'heavy'``. Each field's rules (``ge``, ``choices``, ``keys``) sit beside its default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pipeline.errors import ConfigError
from pipeline.paramsfile import apply_override, preset_path, read_yaml
from pipeline.schema import Section, hints
from pipeline.searchspace import RENAMED
from pipeline.sections.data import DataParams, ShardParams, SyntheticParams
from pipeline.sections.inference import EvaluateParams, PredictParams
from pipeline.sections.model import ModelParams
from pipeline.sections.release import ExportParams, RegisterParams
from pipeline.sections.training import MlflowParams, TrainParams, TuneParams

# the sections' classes live in pipeline/sections/ (import them from there); this module owns the
# root and the loading
__all__ = [
    "SECTIONS",
    "ConfigError",
    "Params",
    "load_params",
    "params_from_mapping",
    "section_from_mapping",
]

S = TypeVar("S", bound="Section")


@dataclass(frozen=True)
class Params:
    """Every param of the pipeline: one field per params.yaml section."""

    synthetic: SyntheticParams = field(default_factory=SyntheticParams)
    shard: ShardParams = field(default_factory=ShardParams)
    model: ModelParams = field(default_factory=ModelParams)
    data: DataParams = field(default_factory=DataParams)
    train: TrainParams = field(default_factory=TrainParams)
    mlflow: MlflowParams = field(default_factory=MlflowParams)
    tune: TuneParams = field(default_factory=TuneParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    register: RegisterParams = field(default_factory=RegisterParams)
    predict: PredictParams = field(default_factory=PredictParams)
    export: ExportParams = field(default_factory=ExportParams)


SECTIONS: dict[str, type[Section]] = {
    f.name: hints(Params)[f.name] for f in dataclasses.fields(Params)
}


def section_from_mapping(cls: type[S], values: Any) -> S:
    """Build one section from a mapping, naming any unknown key or bad value."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{cls.NAME} must be a mapping of params, got {values!r}")
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    if unknown := sorted(set(values) - set(names), key=str):  # keys of any type: 1, null
        if (hint := RENAMED.get(f"{cls.NAME}.{unknown[0]}")) is not None:
            raise ConfigError(f"{cls.NAME}.{unknown[0]} is gone: {hint}")
        raise ConfigError(
            f"{cls.NAME}.{unknown[0]} is not a known param; known: {', '.join(names)}"
        )
    return cls(**values)


def params_from_mapping(raw: Any, where: str = "params") -> Params:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: must be a mapping of sections, got {type(raw).__name__}")
    if unknown := sorted(set(raw) - set(SECTIONS), key=str):
        raise ConfigError(f"{unknown[0]} is not a params section; known: {', '.join(SECTIONS)}")
    sections: dict[str, Any] = {
        name: section_from_mapping(SECTIONS[name], raw[name]) for name in raw
    }
    return Params(**sections)


def load_params(
    path: str | Path | None = "params.yaml",
    overrides: Sequence[str] = (),
    preset: str | None = None,
    overlay: Mapping[str, Mapping[str, Any]] | None = None,
) -> Params:
    """The params of a command: a file (or a preset by name), an ``overlay`` of sections'
    values over it (a search's best params), then ``--set`` overrides.

    A missing default ``params.yaml`` means the code defaults (which equal params.yaml's); a
    missing file named explicitly is an error.
    """
    source = preset_path(preset) if preset else Path(path) if path else None
    if source is None or (not source.exists() and preset is None and str(path) == "params.yaml"):
        raw: dict[str, Any] = {}
    else:
        raw = read_yaml(source)
    for section, values in (overlay or {}).items():
        raw.setdefault(section, {}).update(values)
    for assignment in overrides:
        apply_override(raw, assignment)
    return params_from_mapping(raw, str(source))
