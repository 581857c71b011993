"""The training step of a job, built once for everything that runs it: the training session
(pipeline/training/session.py) and the benches that time it (bench/train_step.py,
bench/time_to_accuracy.py), so a bench measures the configuration training runs.

What a step is made of: cuDNN's autotuner on CUDA; the seeded model (SyncBN across CUDA ranks,
channels_last, ``prepare``d: on its device, DDP under Ray Train) and torch.compile when asked; SGD
with the head's lr group (the fused kernel: pipeline/training/loop.py); the poly schedule with its
warm-up; the weighted loss (OHEM, class weights); fp16's loss scaler; how a batch reaches the
device (the copy, or the GPU's JPEG decode and augmentation); and the options of ``train_steps``
that the recipe decides (precision, accumulation, layout, clipping).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from danet import build_danet
from danet.losses import Ohem, class_weights, segmentation_loss
from danet.model import SegmentationModel
from pipeline.sections import TrainParams
from pipeline.training.job import TrainJob
from pipeline.training.loop import (
    BatchFn,
    LossFn,
    build_optimizer,
    grad_scaler,
    poly_schedule,
    to_device,
    train_steps,
)
from pipeline.training.records import StepRecord

Prepare = Callable[[nn.Module], nn.Module]  # the model onto its device (DDP under Ray Train)


def build_loss(job: TrainJob, device: torch.device) -> LossFn:
    """The three (or four) weighted cross-entropies, with OHEM and class weights when asked."""
    t = job.train
    weight = class_weights(t.class_weights, job.class_pixels, job.class_image_pixels)
    return functools.partial(
        segmentation_loss,
        weights=t.loss_weights,
        class_weight=weight.to(device) if weight is not None else None,
        ohem=Ohem(t.ohem_thresh, t.ohem_min_kept) if t.loss == "ohem" else None,
    )


def build_model(
    job: TrainJob,
    world: int,
    device: torch.device,
    weights: Any = None,
    prepare: Prepare | None = None,
) -> tuple[nn.Module, SegmentationModel]:
    """The model as it is stepped (``prepare``d: on its device, DDP when there are several ranks;
    SyncBN and channels_last when asked) and the plain module inside. ``weights``: the backbone's
    pretrained weights, instead of a download."""
    from pipeline.training.finetune import init_from

    config = job.model.to_danet_config(job.num_classes)
    model = build_danet(dataclasses.replace(config, pretrained=False, pretrained_path=None))
    if weights is not None:
        model.backbone.load_weights(weights)
    if job.model.init_from:
        init_from(model, job.model.init_from, job.tracking_uri)
    if world > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if job.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    wrapped = prepare(model) if prepare is not None else model.to(device)
    core: SegmentationModel = wrapped.module if hasattr(wrapped, "module") else wrapped  # type: ignore[assignment]
    return wrapped, core


def step_options(train: TrainParams) -> dict[str, Any]:
    """The options of ``train_steps`` that the recipe decides."""
    return {
        "precision": train.precision,
        "accumulate": train.accumulate,
        "channels_last": train.channels_last,
        "grad_clip": train.grad_clip,
    }


def batch_path(job: TrainJob, device: torch.device) -> BatchFn:
    """How the loader's batches reach ``device``: JPEGs decoded and augmented there (CUDA with
    ``data.gpu_decode``: pipeline/data/gpu.py), or ready batches copied."""
    if not (job.data.gpu_decode and device.type == "cuda"):
        return to_device
    from pipeline.data.gpu import decode_batch

    crop, mean, std = job.data.crop_size, job.mean, job.std
    return lambda batch, dev: decode_batch(batch, crop, mean, std, dev)


@dataclass
class Step:
    """A job's training step as ``build_step`` makes it; ``run`` trains over some batches."""

    model: nn.Module  # as it is stepped: DDP and/or compiled
    core: SegmentationModel  # the plain module inside
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: LossFn
    scaler: torch.amp.GradScaler | None  # fp16's loss scale
    batch_fn: BatchFn
    device: torch.device
    options: dict[str, Any]  # ``step_options``

    def run(self, batches: Iterable[Any], **overrides: Any) -> StepRecord:
        """``train_steps`` over ``batches`` with this step's parts and options; ``overrides``
        are further ``train_steps`` options (``log_every``, ``on_log``, ``batch_fn``, ...) or
        another ``scheduler``."""
        kwargs = {"scaler": self.scaler, "batch_fn": self.batch_fn, **self.options, **overrides}
        scheduler = kwargs.pop("scheduler", self.scheduler)
        return train_steps(
            self.model, batches, self.optimizer, scheduler, self.loss_fn, self.device, **kwargs
        )


def build_step(
    job: TrainJob,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    weights: Any = None,
    prepare: Prepare | None = None,
) -> Step:
    """The training step of ``job`` on rank ``rank`` of ``world``, at iteration 0: what a
    training run steps and what the benches time (see the module's docstring)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(job.train.seed * 1000 + rank)
    wrapped, core = build_model(job, world, device, weights, prepare)
    t = job.train
    optimizer = build_optimizer(core, t.lr, t.momentum, t.weight_decay, t.head_lr_mult)
    return Step(
        model=torch.compile(wrapped) if t.compile else wrapped,  # type: ignore[arg-type]
        core=core,
        optimizer=optimizer,
        scheduler=poly_schedule(
            optimizer, t.max_iters, t.poly_power, t.warmup_iters, t.warmup_ratio
        ),
        loss_fn=build_loss(job, device),
        scaler=grad_scaler(t.precision, device),
        batch_fn=batch_path(job, device),
        device=device,
        options=step_options(t),
    )
