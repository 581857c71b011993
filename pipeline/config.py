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


@dataclass(frozen=True)
class ModelParams:
    """The architecture; ``num_classes`` comes from the shard manifest (0 = take it from there)."""

    backbone: str = "resnet18d"
    head: str = "danet"
    output_stride: int = 8
    multi_grid: tuple[int, ...] | None = None
    aux: bool = False
    attention_impl: str = "auto"
    dropout: float = 0.1
    pretrained: bool = False
    pretrained_path: str | None = None
    num_classes: int = 0

    def to_danet_config(self, num_classes: int) -> Any:
        """The ``DANetConfig``; a ``num_classes`` param must agree with the manifest's classes."""
        from danet import DANetConfig

        if self.num_classes and self.num_classes != num_classes:
            raise ConfigError(
                f"model.num_classes is {self.num_classes} but the shard manifest has {num_classes} classes"
            )
        values = {k: v for k, v in dataclasses.asdict(self).items() if k != "num_classes"}
        try:
            return DANetConfig(num_classes=num_classes, **values)
        except ValueError as err:
            raise ConfigError(str(err)) from None


@dataclass(frozen=True)
class DataParams:
    """Loader and training augmentation (pipeline/data.py, pipeline/transforms.py)."""

    shards: str = "data/shards"
    train_split: str = "train"
    val_split: str = "val"
    crop_size: int = 96
    base_size: int = 0
    scale_min: float = 0.5
    scale_max: float = 2.0
    flip: bool = True
    photometric: bool = False
    shuffle_buffer: int = 64
    loader_workers: int = 0

    def __post_init__(self) -> None:
        _check(self.crop_size >= 16, f"data.crop_size must be >= 16, got {self.crop_size}")
        _check(self.base_size >= 0, f"data.base_size must be >= 0, got {self.base_size}")
        _check(
            0 < self.scale_min <= self.scale_max,
            f"data.scale_min/scale_max must satisfy 0 < min <= max, got {self.scale_min}, {self.scale_max}",
        )
        _check(
            self.shuffle_buffer >= 1, f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}"
        )
        _check(
            self.loader_workers >= 0, f"data.loader_workers must be >= 0, got {self.loader_workers}"
        )


@dataclass(frozen=True)
class TrainParams:
    """The recipe (SGD, poly schedule, three losses) and the Ray scaling of ``danet train``."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    head_lr_mult: float = 10.0
    poly_power: float = 0.9
    batch_size: int = 8  # per worker
    epochs: int = 10
    iters_per_epoch: int = 30
    eval_every_epochs: int = 1
    log_every: int = 10
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {"out": 1.0, "pam": 1.0, "cam": 1.0, "aux": 0.4}
    )
    bf16: bool = True  # autocast on GPU only
    channels_last: bool = False
    grad_clip: float = 0.0  # max grad norm; 0 = off
    seed: int = 0
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 2
    checkpoints_to_keep: int = 1  # best by val mIoU; Ray keeps the latest as well
    run_name: str = ""  # "" = derived from the config: the same config resumes, another starts anew
    storage_path: str = "outputs/ray_results"
    out: str = "outputs/train"
    ray_address: str = ""  # "" = RAY_ADDRESS or a local Ray

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _check(0 <= self.momentum < 1, f"train.momentum must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.head_lr_mult > 0, f"train.head_lr_mult must be > 0, got {self.head_lr_mult}")
        _check(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _check(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        _check(
            self.iters_per_epoch >= 1,
            f"train.iters_per_epoch must be >= 1, got {self.iters_per_epoch}",
        )
        _check(
            self.eval_every_epochs >= 1,
            f"train.eval_every_epochs must be >= 1, got {self.eval_every_epochs}",
        )
        _check(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        _check(self.grad_clip >= 0, f"train.grad_clip must be >= 0, got {self.grad_clip}")
        _check(self.num_workers >= 1, f"train.num_workers must be >= 1, got {self.num_workers}")
        _check(
            self.cpus_per_worker >= 1,
            f"train.cpus_per_worker must be >= 1, got {self.cpus_per_worker}",
        )
        _check(self.max_failures >= 0, f"train.max_failures must be >= 0, got {self.max_failures}")
        _check(self.checkpoints_to_keep >= 1, "train.checkpoints_to_keep must be >= 1")
        unknown = set(self.loss_weights) - {"out", "pam", "cam", "aux"}
        _check(
            not unknown,
            f"train.loss_weights has unknown outputs {sorted(unknown)}; use out, pam, cam, aux",
        )

    @property
    def max_iters(self) -> int:
        return self.epochs * self.iters_per_epoch


@dataclass(frozen=True)
class MlflowParams:
    """Tracking: URI (env MLFLOW_TRACKING_URI wins), experiment ("" = the dataset's name)."""

    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = ""
    log_model: bool = True
    num_prediction_images: int = 4
