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
from pipeline.schema import Section, hints, param, require
from pipeline.searchspace import RENAMED, check_space

S = TypeVar("S", bound="Section")


@dataclass(frozen=True)
class SyntheticParams(Section):
    """The embedded synthetic dataset (pipeline/data/readers/synthetic.py)."""

    NAME = "synthetic"
    num_samples: dict[str, int] = param({"train": 240, "val": 60}, ge=1, name=True)
    width: int = param(160, ge=32)
    height: int = param(120, ge=32)
    seed: int = 0
    out: str = ""  # danet synthetic: the scenes as a folder dataset of PNGs (to predict)
    splits: tuple[str, ...] = param(("val",), name=True)  # folders under out: plain names
    count: int = param(0, ge=0)  # the first N scenes of each split; 0 = all

    GENERATOR = ("num_samples", "width", "height", "seed")  # what the scenes are

    def check(self) -> None:
        require(bool(self.num_samples), "synthetic.num_samples must name at least one split")

    def generator(self) -> dict[str, Any]:
        """The options of the scene generator (pipeline/data/readers/synthetic.py)."""
        return {k: getattr(self, k) for k in self.GENERATOR}


@dataclass(frozen=True)
class ShardParams(Section):
    """Raw dataset -> WebDataset shards (pipeline/data/shard.py)."""

    NAME = "shard"
    dataset: str = "synthetic"
    root: str = ""
    out: str = "data/shards"
    splits: tuple[str, ...] = param(("train", "val"), name=True)  # {split}-*.tar, plain names
    max_count: int = param(100, ge=1)
    max_size_mb: float = param(256.0, gt=0)
    image_format: str = param("original", choices=("original", "jpg"))
    jpeg_quality: int = param(95, ge=1, le=100)
    workers: int = param(2, ge=1)
    on_error: str = param("fail", choices=("fail", "skip"))

    def check(self) -> None:
        require(bool(self.splits), "shard.splits must name at least one split")


@dataclass(frozen=True)
class ModelParams(Section):
    """The architecture; ``num_classes`` comes from the shard manifest (0 = take it from there)."""

    NAME = "model"
    backbone: str = "resnet18d"
    head: str = param("danet", choices=("danet", "fcn"))
    output_stride: int = param(8, choices=(8, 16))
    multi_grid: tuple[int, ...] | None = param(None, ge=1)
    aux: bool = False
    attention_impl: str = param("auto", choices=("dense", "efficient", "auto"))
    dropout: float = param(0.1, ge=0.0, lt=1.0)
    pretrained: bool = False
    pretrained_path: str | None = None
    num_classes: int = param(0, ge=0)
    init_from: str = ""  # fine-tune from a segmentation model (model.pt, run id, models:/...)

    def to_danet_config(self, num_classes: int) -> Any:
        """The ``DANetConfig``; a ``num_classes`` param must agree with the manifest's classes."""
        from danet import DANetConfig

        if self.num_classes and self.num_classes != num_classes:
            raise ConfigError(
                f"model.num_classes is {self.num_classes} but the shard manifest has {num_classes} classes"
            )
        values = dataclasses.asdict(self)
        del values["num_classes"], values["init_from"]
        try:
            return DANetConfig(num_classes=num_classes, **values)
        except ValueError as err:
            raise ConfigError(str(err)) from None


@dataclass(frozen=True)
class DataParams(Section):
    """Loader and training augmentation (pipeline/data/augment.py, pipeline/data/loader.py)."""

    NAME = "data"
    shards: str = "data/shards"
    train_split: str = param("train", name=True)
    val_split: str = param("val", name=True)
    crop_size: int = param(96, ge=16)
    scale_mode: str = param("long_side", choices=("short_side", "ratio", "long_side"))
    base_size: int = param(0, ge=0)  # short_side / long_side: 0 = the image's own side
    scale: tuple[int, ...] = param((), ge=1)  # ratio: mmseg's (W, H) scale
    scale_min: float = param(0.75, gt=0)
    scale_max: float = param(1.5, gt=0)
    cat_max_ratio: float = param(1.0, gt=0, le=1)
    flip: bool = True
    photometric: bool = False
    normalization: str = param("auto", choices=("auto", "imagenet", "dataset"))
    shuffle_buffer: int = param(64, ge=1)
    loader_workers: int = param(0, ge=0)
    gpu_decode: bool = True  # on CUDA: JPEGs decoded and augmented on the GPU

    def check(self) -> None:
        require(
            self.scale_min <= self.scale_max,
            f"data.scale_min/scale_max must satisfy min <= max, got {self.scale_min}, {self.scale_max}",
        )
        require(
            self.scale_mode != "ratio" or len(self.scale) == 2,
            f"data.scale must be [W, H] with data.scale_mode ratio, got {list(self.scale)}",
        )


LOSS_OUTPUTS = ("out", "pam", "cam", "aux")


@dataclass(frozen=True)
class TrainParams(Section):
    """The recipe (SGD, poly schedule, losses) and the Ray scaling of ``danet train``."""

    NAME = "train"
    lr: float = param(0.01, gt=0)
    momentum: float = param(0.9, ge=0, lt=1)
    weight_decay: float = param(1e-4, ge=0)
    head_lr_mult: float = param(10.0, gt=0)
    poly_power: float = param(0.9, ge=0)
    batch_size: int = param(8, ge=1)  # global: split over train.num_workers
    epochs: int = param(15, ge=1)
    iters_per_epoch: int = param(25, ge=1)
    eval_every_epochs: int = param(5, ge=1)
    log_every: int = param(10, ge=1)
    loss_weights: dict[str, float] = param(
        {"out": 1.0, "pam": 1.0, "cam": 1.0, "aux": 0.4}, keys=LOSS_OUTPUTS, ge=0
    )
    loss: str = param("ce", choices=("ce", "ohem"))
    ohem_thresh: float = param(0.7, gt=0, le=1)
    ohem_min_kept: int = param(100_000, ge=0)  # per image
    class_weights: str = param("none", choices=("none", "median_frequency", "enet"))
    precision: str = param("bf16", choices=("fp32", "bf16", "fp16"))  # fp16: loss-scaled
    accumulate: int = param(1, ge=1)  # micro-batches per optimizer step (batch_size is global)
    channels_last: bool = True
    compile: bool = False  # torch.compile the model
    grad_clip: float = param(0.0, ge=0)  # max gradient norm; 0 = off
    warmup_iters: int = param(0, ge=0)  # linear warm-up of the lr (mmseg's); 0 = none
    warmup_ratio: float = param(1e-6, gt=0, le=1)  # the warm-up's first lr, x the schedule's
    spike_factor: float = param(5.0, ge=0)  # a log window's loss above this x its mean: recover
    recover_lr_factor: float = param(0.5, gt=0, le=1)  # every lr x this at a recovery
    max_recoveries: int = param(3, ge=0)  # then stop (TrainingDiverged); 0 = stop at the first
    seed: int = 0
    num_workers: int = param(1, ge=1)
    use_gpu: bool = False
    gpus_per_worker: float = param(1.0, gt=0, le=1)  # with use_gpu; < 1: runs share a GPU
    cpus_per_worker: int = param(2, ge=1)
    placement_strategy: str = param(
        "PACK", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
    )
    max_failures: int = param(2, ge=0)
    checkpoints_to_keep: int = param(1, ge=1)
    checkpoint_every: int = param(0, ge=0)  # iterations; 0 = at evaluations only
    run_name: str = param("", name=True)  # "" = derived from the config: the same config resumes
    storage_path: str = "outputs/ray_results"
    out: str = "outputs/train"
    ray_address: str = ""  # "" = RAY_ADDRESS or a local Ray

    def check(self) -> None:
        require(
            self.batch_size % (self.num_workers * self.accumulate) == 0,
            f"train.batch_size {self.batch_size} does not split evenly over train.num_workers "
            f"{self.num_workers} x train.accumulate {self.accumulate}",
        )
        f = self.spike_factor  # below 1, every window would look like a spike
        require(f == 0 or f > 1, f"train.spike_factor must be 0 (off) or above 1, got {f}")

    @property
    def max_iters(self) -> int:
        return self.epochs * self.iters_per_epoch

    @property
    def worker_batch(self) -> int:
        """Images per worker and micro-batch (accumulate micro-batches of all workers: a step)."""
        return self.batch_size // (self.num_workers * self.accumulate)


@dataclass(frozen=True)
class MlflowParams(Section):
    """Tracking: URI (env MLFLOW_TRACKING_URI wins), experiment ("" = the dataset's name)."""

    NAME = "mlflow"
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = ""
    log_model: bool = True  # model.pt into the run (danet register needs it there)
    num_prediction_images: int = param(4, ge=0)  # overlays logged at every evaluation
    system_metrics_every: float = param(10.0, ge=0)  # s between CPU/memory/GPU samples; 0 = off


@dataclass(frozen=True)
class TuneParams(Section):
    """Ray Tune: ``space`` maps params keys (dotted, as ``--set``) to distributions; a random or
    Optuna (TPE) searcher; ASHA on val mIoU or no early stopping."""

    NAME = "tune"
    space: dict[str, dict[str, Any]] = param(
        {"train.lr": {"loguniform": [0.005, 0.02]}, "data.crop_size": {"choice": [80, 96]}}
    )
    search_alg: str = param("random", choices=("random", "optuna"))
    scheduler: str = param("asha", choices=("asha", "none"))
    num_samples: int = param(2, ge=1)
    max_concurrent: int = param(2, ge=1)
    epochs: int = param(2, ge=1)  # per trial; replaces train.epochs
    eval_every_epochs: int = param(1, ge=0)  # ASHA's rungs; 0 = train.eval_every_epochs
    cpus_per_trial: int = param(1, ge=0)  # each trial's Train worker; 0 = train.cpus_per_worker
    gpus_per_trial: float = param(0.0, ge=0, le=1)  # with use_gpu; 0 = train.gpus_per_worker
    grace_period: int = param(1, ge=1)  # evaluations before ASHA may stop a trial
    reduction_factor: float = param(2.0, gt=1)
    seed: int = 0
    name: str = param("", name=True)  # "" = derived from the config: the same config resumes
    out: str = "outputs/tune"

    def check(self) -> None:
        fields = {k: [f.name for f in dataclasses.fields(v)] for k, v in SECTIONS.items()}  # type: ignore[arg-type]
        check_space(self.space, self.search_alg, fields)


@dataclass(frozen=True)
class ProtocolParams(Section):
    """An inference protocol (danet/inference.py) of evaluate and predict (each has its mode, flip)."""

    reference: str = param("official", choices=("official", "mmseg"))
    crop: int = param(512, ge=16)  # sliding-window crop
    stride: int = param(0, ge=0)  # 0 = the reference's default
    scales: tuple[float, ...] = param((1.0,), gt=0)  # several: multi-scale
    base_size: int = param(0, ge=0)  # official: long side at scale 1 (0 = the image's own)
    test_scale: tuple[int, ...] = param((), ge=1)  # mmseg: [W, H] keep-ratio test resize
    window_batch: int = param(8, ge=1)  # sliding windows per forward pass

    def check(self) -> None:
        require(bool(self.scales), f"{self.NAME}.scales must list at least one scale")
        require(
            len(self.test_scale) in (0, 2),
            f"{self.NAME}.test_scale must be [] or [W, H], got {list(self.test_scale)}",
        )


@dataclass(frozen=True)
class EvaluateParams(ProtocolParams):
    """``danet evaluate``: which model, which split, which protocol."""

    NAME = "evaluate"
    model: str = "auto"  # auto = the better of train.out and tune.out; or a file, run id, URI
    shards: str = "data/shards"
    split: str = param("val", name=True)
    mode: str = param("whole", choices=("whole", "slide"))
    flip: bool = True
    out: str = "outputs/eval"
    num_overlays: int = param(4, ge=0)
    device: str = param("auto", choices=("auto", "cpu", "cuda"))
    bf16: bool = False  # autocast on CUDA and CPUs with native bf16 (energies fp32)
    workers: int = param(1, ge=1)  # > 1: Ray tasks (a GPU each when there are GPUs)


@dataclass(frozen=True)
class RegisterParams(Section):
    """``danet register``: the MLflow registered model and what it is registered from."""

    NAME = "register"
    name: str = param("", name=True)  # "" = danet-<dataset>
    eval_metrics: str = "outputs/eval/metrics.json"
    out: str = "outputs/register/registered.json"
    # danet export files of the registered weights, served on request (params.runtime)
    onnx: tuple[str, ...] = ()


@dataclass(frozen=True)
class PredictParams(ProtocolParams):
    """``danet predict`` (files or a split of shards; ``format``: pipeline/registry/formats.py)
    and the served model's defaults; ``mode: auto`` slides over images above ``slide_above``."""

    NAME = "predict"
    model: str = ""  # model.pt, run id, runs:/ or models:/ URI
    out: str = "outputs/predict"
    shards: str = ""  # predict a split of these shards (folder or URL) instead of files
    split: str = param("test", name=True)  # ... this split, labelled or images only
    format: str = param("masks", choices=("masks", "cityscapes", "voc"))
    mode: str = param("auto", choices=("auto", "whole", "slide"))
    slide_above: int = param(1024, ge=0)
    flip: bool = False  # add horizontally flipped predictions
    device: str = param("auto", choices=("auto", "cpu", "cuda"))


@dataclass(frozen=True)
class ExportParams(Section):
    """``danet export``: a model as an ONNX file for ONNX Runtime, TensorRT, OpenVINO, ..."""

    NAME = "export"
    model: str = ""  # model.pt, run id, runs:/ or models:/ URI
    out: str = "outputs/export/model.onnx"
    format: str = param("onnx", choices=("onnx",))
    # fused: ONNX Runtime's MultiHeadAttention, no N x N map (1024x2048 fits in memory);
    # standard: MatMul/Softmax, any runtime, holds the map (4 GiB per 1024x2048 image)
    attention: str = param("fused", choices=("fused", "standard"))
    opset: int = param(18, ge=17, le=23)
    quantize: str = param("none", choices=("none", "int8"))
    # int8: static quantization calibrated on images of these shards
    calibration_shards: str = "data/shards"
    calibration_split: str = param("train", name=True)
    calibration_images: int = param(32, ge=1)
    calibration_method: str = param("minmax", choices=("minmax", "percentile", "entropy"))


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
