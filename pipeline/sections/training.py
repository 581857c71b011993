"""The training sections: the recipe and its Ray scaling, MLflow tracking, the search."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pipeline.schema import MAX_SEED, MAX_TRIALS, Section, param, require
from pipeline.searchspace import check_space

LOSS_OUTPUTS = ("out", "pam", "cam", "aux")


@dataclass(frozen=True)
class TrainParams(Section):
    """The recipe (SGD, poly schedule, losses) and the Ray scaling of ``danet train``."""

    NAME = "train"
    lr: float = param(0.01, gt=0, le=1e6)  # bench/time_to_accuracy.py diverges at x1e6
    momentum: float = param(0.9, ge=0, lt=1)
    weight_decay: float = param(1e-4, ge=0, le=1)
    head_lr_mult: float = param(10.0, gt=0, le=1000)
    poly_power: float = param(0.9, ge=0, le=100)
    batch_size: int = param(8, ge=1, le=1_000_000)  # global: split over train.num_workers
    epochs: int = param(15, ge=1, le=1_000_000)
    iters_per_epoch: int = param(25, ge=1, le=1_000_000)
    eval_every_epochs: int = param(5, ge=1, le=1_000_000)
    log_every: int = param(10, ge=1, le=10**9)
    loss_weights: dict[str, float] = param(
        {"out": 1.0, "pam": 1.0, "cam": 1.0, "aux": 0.4}, keys=LOSS_OUTPUTS, ge=0, le=1000
    )
    loss: str = param("ce", choices=("ce", "ohem"))
    ohem_thresh: float = param(0.7, gt=0, le=1)
    ohem_min_kept: int = param(100_000, ge=0, le=10**9)  # per image
    class_weights: str = param("none", choices=("none", "median_frequency", "enet"))
    precision: str = param("bf16", choices=("fp32", "bf16", "fp16"))  # fp16: loss-scaled
    accumulate: int = param(
        1, ge=1, le=10_000
    )  # micro-batches per optimizer step (batch_size is global)
    channels_last: bool = True
    compile: bool = False  # torch.compile the model
    grad_clip: float = param(0.0, ge=0)  # max gradient norm; 0 = off
    warmup_iters: int = param(0, ge=0, le=10**9)  # linear warm-up of the lr (mmseg's); 0 = none
    warmup_ratio: float = param(1e-6, gt=0, le=1)  # the warm-up's first lr, x the schedule's
    spike_factor: float = param(5.0, ge=0)  # a log window's loss above this x its mean: recover
    recover_lr_factor: float = param(0.5, gt=0, le=1)  # every lr x this at a recovery
    max_recoveries: int = param(
        3, ge=0, le=1000
    )  # then stop (TrainingDiverged); 0 = stop at the first
    seed: int = param(0, ge=0, le=MAX_SEED)
    num_workers: int = param(1, ge=1, le=100_000)
    use_gpu: bool = False
    gpus_per_worker: float = param(1.0, gt=0, le=1)  # with use_gpu; < 1: runs share a GPU
    cpus_per_worker: int = param(2, ge=1, le=100_000)
    placement_strategy: str = param(
        "PACK", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
    )
    max_failures: int = param(2, ge=0, le=1000)
    checkpoints_to_keep: int = param(1, ge=1, le=1000)
    checkpoint_every: int = param(0, ge=0, le=10**9)  # iterations; 0 = at evaluations only
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
    num_prediction_images: int = param(4, ge=0, le=256)  # overlays logged at every evaluation
    system_metrics_every: float = param(
        10.0, ge=0, le=86_400
    )  # s between CPU/memory/GPU samples; 0 = off


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
    num_samples: int = param(2, ge=1, le=MAX_TRIALS)
    max_concurrent: int = param(2, ge=1, le=100_000)
    epochs: int = param(2, ge=1, le=1_000_000)  # per trial; replaces train.epochs
    eval_every_epochs: int = param(
        1, ge=0, le=1_000_000
    )  # ASHA's rungs; 0 = train.eval_every_epochs
    cpus_per_trial: int = param(
        1, ge=0, le=100_000
    )  # each trial's Train worker; 0 = train.cpus_per_worker
    gpus_per_trial: float = param(0.0, ge=0, le=1)  # with use_gpu; 0 = train.gpus_per_worker
    grace_period: int = param(1, ge=1, le=1_000_000)  # evaluations before ASHA may stop a trial
    reduction_factor: float = param(2.0, gt=1, le=1000)
    seed: int = param(0, ge=0, le=MAX_SEED)
    name: str = param("", name=True)  # "" = derived from the config: the same config resumes
    out: str = "outputs/tune"

    def check(self) -> None:
        known = Section.KNOWN.items()  # pipeline/sections/__init__ imported every section
        fields = {k: [f.name for f in dataclasses.fields(v)] for k, v in known}  # type: ignore[arg-type]
        check_space(self.space, self.search_alg, fields)
