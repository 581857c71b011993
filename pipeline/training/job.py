"""A training job: everything a worker needs, checked by the driver before any work starts.

A run's identity (its default name, ``danet-<hash>``) is a digest of what decides its result: the
model, data and recipe params, the shards' digests, and the code that decides its weights (the
import closure of the worker, as it is on disk, committed or not, less the modules that
configure, report, plot or serve: ``IDENTITY_ROOTS``, ``NOT_WEIGHTS``). The same identity
resumes; new code, params or data start a new run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.artifacts.modelfile import read_model_info
from pipeline.codebase import PROJECT, closure
from pipeline.config import ConfigError
from pipeline.data.augment import IMAGENET_MEAN, IMAGENET_STD, largest_side
from pipeline.data.manifest import Manifest, ShardRef, load_manifest, shard_refs
from pipeline.modelrefs import parse_model_ref
from pipeline.sections import DataParams, ModelParams, TrainParams

# A run's code identity is the code that decides its weights: the import closure of the worker
# (the model library, loop, loss, loader and augmentation, this job, the checkpoint and model
# file formats), read from the source. The closure stops at the modules that configure, report,
# plot, log or serve (params enter the identity as values; metrics and pictures change no weight),
# so a comment there reuses every finished run. tests/test_layout.py edits each module in turn.
IDENTITY_ROOTS = ("pipeline.training.worker", "pipeline.training.job")
NOT_WEIGHTS = (
    "pipeline",  # the package's docstring
    "pipeline.codebase",
    "pipeline.config",
    "pipeline.schema",
    "pipeline.errors",
    "pipeline.logs",
    "pipeline.outputs",
    "pipeline.locks",
    "pipeline.pictures",
    "pipeline.training.tracker",
    "pipeline.training.results",
    "pipeline.artifacts.refs",
    "pipeline.mlflowstore",
    "pipeline.modelrefs",  # which file model.init_from names: its value is a param
    "pipeline.artifacts.pyfunc",
)
# Params that do not change a run's result: left out of its identity.
NOT_IDENTITY = (
    "run_name",
    "storage_path",
    "out",
    "ray_address",
    "max_failures",
    "log_every",
    "checkpoints_to_keep",
    "gpus_per_worker",  # a share of a GPU or a whole one: the same computation
)


@dataclass(frozen=True)
class TrainJob:
    """What every worker needs; built and checked by the driver, pickled to the workers."""

    model: ModelParams
    data: DataParams
    train: TrainParams
    dataset: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_shards: tuple[ShardRef, ...]
    val_shards: tuple[ShardRef, ...]
    manifest_sha256: str
    class_pixels: tuple[int, ...]  # of the training split, per class
    class_image_pixels: tuple[int, ...]  # pixels of the training images that contain each class
    split_sha256: tuple[tuple[str, str], ...] = ()  # (split, digest): train's then val's
    tracking_uri: str = ""
    mlflow_run_id: str = ""
    system_metrics_every: float = 0.0  # s between rank 0's samples of its node's CPU/GPU; 0 off
    prediction_images: int = 0  # overlays logged at every evaluation

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def normalization(
    model: ModelParams, data: DataParams, manifest: Manifest
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet's mean/std for a pretrained backbone (what its weights expect), the dataset's own
    (from the manifest) when training from scratch; ``data.normalization`` can force either."""
    mode = data.normalization
    if mode == "auto":
        mode = "imagenet" if (model.pretrained or model.pretrained_path) else "dataset"
    return (IMAGENET_MEAN, IMAGENET_STD) if mode == "imagenet" else (manifest.mean, manifest.std)


def prepare_job(
    model: ModelParams, data: DataParams, train: TrainParams, crop_from: str = ""
) -> TrainJob:
    """Check every input before any work starts: shards, classes, architecture, crop
    (``crop_from``: the param the crop size came from, when not data.crop_size itself)."""
    manifest = load_manifest(data.shards)
    model = resolve_init_from(model)
    model.to_danet_config(manifest.num_classes)  # validates backbone, head, classes
    check_loss_weights(model, train)
    if train.use_gpu and train.num_workers > 1 and train.gpus_per_worker < 1:
        raise ConfigError(
            f"train.gpus_per_worker (or tune.gpus_per_trial) {train.gpus_per_worker} with "
            f"train.num_workers {train.num_workers}: the workers of one run need a whole GPU each "
            "(NCCL)"
        )
    for split, param in (
        (data.train_split, "data.train_split"),
        (data.val_split, "data.val_split"),
    ):
        if manifest.labelled_split(split, param).samples == 0:
            raise ConfigError(f"data.shards {data.shards}: split {split!r} has no images")
    train_shards = shard_refs(manifest, data.train_split)
    val_shards = shard_refs(manifest, data.val_split)
    job = TrainJob(
        model=model,
        data=data,
        train=train,
        dataset=manifest.dataset,
        classes=manifest.classes,
        palette=manifest.palette,
        mean=(),
        std=(),
        train_shards=tuple(train_shards),
        val_shards=tuple(val_shards),
        manifest_sha256=manifest.sha256,
        class_pixels=manifest.split(data.train_split).class_pixels,
        class_image_pixels=manifest.split(data.train_split).class_image_pixels,
        split_sha256=tuple(
            (s, manifest.split_digest(s)) for s in (data.train_split, data.val_split)
        ),
    )
    w, h = manifest.split(data.train_split).max_size
    largest = largest_side(h, w, data)
    if data.crop_size > largest:
        raise ConfigError(
            f"{crop_from + ': ' if crop_from else ''}"
            f"data.crop_size {data.crop_size} is larger than any crop the loader can produce: the "
            f"largest scaled image side is {largest} (data.scale_mode, base_size/scale, scale_max)"
        )
    mean, std = normalization(model, data, manifest)
    return dataclasses.replace(job, mean=tuple(mean), std=tuple(std))


def resolve_init_from(model: ModelParams) -> ModelParams:
    """``model.init_from`` as a model file is checked here, before Ray starts, and made absolute:
    the workers run in other working directories. MLflow references are resolved by them."""
    ref = model.init_from
    parsed = parse_model_ref(ref)
    if not ref or parsed.in_mlflow:
        return model
    path = Path(ref).resolve()
    if not path.is_file():
        raise ConfigError(f"model.init_from {ref}: model file does not exist ({path})")
    read_model_info(path)  # a corrupt or foreign file: one line now, not on every worker
    return dataclasses.replace(model, init_from=str(path))


def check_loss_weights(model: ModelParams, train: TrainParams) -> None:
    """At least one output the model has must carry a weight: all zero would learn nothing."""
    outputs = [
        "out",
        *(["pam", "cam"] if model.head == "danet" else []),
        *(["aux"] if model.aux else []),
    ]
    if not any(train.loss_weights.get(name, 0.0) > 0 for name in outputs):
        raise ConfigError(
            f"train.loss_weights: every output this model trains ({', '.join(outputs)}) has "
            "weight 0: nothing would be learned"
        )


def identity_files(root: Path = PROJECT) -> list[Path]:
    """The files whose code decides a run's weights (see ``IDENTITY_ROOTS``)."""
    return sorted(closure(IDENTITY_ROOTS, root, stop=NOT_WEIGHTS, packages=False))


def code_digest(root: Path = PROJECT) -> str:
    """sha256 over the files that decide a run's weights, as they are on disk (committed or not)."""
    digest = hashlib.sha256()
    for path in identity_files(root):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def identity(job: TrainJob) -> dict[str, Any]:
    """Everything that decides a run's result."""
    train = {k: v for k, v in dataclasses.asdict(job.train).items() if k not in NOT_IDENTITY}
    data = dataclasses.asdict(job.data)
    data.pop("shards")  # the location: the shards' digests say what they hold
    shards = [r.sha256 for r in (*job.train_shards, *job.val_shards)]
    return {
        "model": dataclasses.asdict(job.model),
        "data": data,
        "train": train,
        "shards": shards,
        "code": code_digest(),
    }


def default_run_name(job: TrainJob) -> str:
    """``danet-<hash>`` of the run's identity: the same identity resumes."""
    blob = json.dumps(identity(job), sort_keys=True, default=str)
    return "danet-" + hashlib.sha256(blob.encode()).hexdigest()[:10]


def device_of(train: TrainParams) -> str:
    """Where a run trains, as its params resolve it: ``cpu x 1``, ``cuda x 4``."""
    return f"{'cuda' if train.use_gpu else 'cpu'} x {train.num_workers}"


def flat_params(job: TrainJob) -> dict[str, str]:
    """The job's params as MLflow logs them (``section.key``), resolved as the run uses them:
    ``model.num_classes`` the dataset's count (0 in params.yaml means "the dataset's"),
    ``data.gpu_decode`` false off CUDA, and ``device``, where it trains."""
    out = {"dataset": job.dataset, "device": device_of(job.train)}
    for section, values in (("model", job.model), ("data", job.data), ("train", job.train)):
        for key, value in dataclasses.asdict(values).items():
            out[f"{section}.{key}"] = str(value)[:6000]
    out["model.num_classes"] = str(job.num_classes)
    out["data.gpu_decode"] = str(job.data.gpu_decode and job.train.use_gpu)
    return out
