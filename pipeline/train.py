"""Distributed training with Ray Train (V2 API): ``run_training`` drives, ``train_worker`` trains.

The same code runs on one CPU, one GPU or a cluster: the scaling comes from params.yaml
(``train.num_workers``, ``use_gpu``, ``cpus_per_worker``) and ``train.ray_address`` /
``RAY_ADDRESS`` picks the cluster. Every worker reads its own share of the shards
(pipeline/data.py); rank 0 reports a checkpoint at every evaluation and logs to MLflow.

A run is named after its config (or ``train.run_name``): started again with the same name, Ray
Train V2 hands the workers the run's latest checkpoint and training continues where it stopped,
schedule included. ``FailureConfig(max_failures)`` restarts the workers after a crash, from that
checkpoint too.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from danet import build_danet
from danet.metrics import summarize
from danet.model import SegmentationModel, Segmenter
from pipeline.atomic import atomic_dir
from pipeline.config import ConfigError, DataParams, MlflowParams, ModelParams, TrainParams
from pipeline.data import EvalStream, TrainStream, eval_loader, train_loader
from pipeline.loop import build_optimizer, evaluate, poly_schedule, train_steps
from pipeline.shard import load_manifest, shard_urls
from pipeline.transforms import AugmentParams

STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"
METRIC = "val_miou"


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs; built and checked by the driver, pickled to the workers."""

    model: ModelParams
    data: DataParams
    train: TrainParams
    num_classes: int
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_urls: tuple[str, ...]
    val_urls: tuple[str, ...]
    tracking_uri: str = ""
    mlflow_run_id: str = ""
    fault: tuple[int, int, str] | None = None  # test hook: (epoch, rank, marker file) -> crash once

    def augment(self) -> AugmentParams:
        d = self.data
        return AugmentParams(
            d.crop_size, d.base_size, d.scale_min, d.scale_max, d.flip, d.photometric
        )


# --- worker ---------------------------------------------------------------------------------


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: build loader and model, resume if a checkpoint exists, train, report."""
    import ray.train
    import ray.train.torch

    job: TrainJob = config["job"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(job.train.seed * 1000 + rank)

    model = build_danet(job.model.to_danet_config(job.num_classes))
    if world > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    wrapped = ray.train.torch.prepare_model(model)  # moves to device; DDP when world > 1
    core: SegmentationModel = wrapped.module if hasattr(wrapped, "module") else wrapped  # type: ignore[assignment]
    t = job.train
    optimizer = build_optimizer(core, t.lr, t.momentum, t.weight_decay, t.head_lr_mult)
    scheduler = poly_schedule(optimizer, t.max_iters, t.poly_power)

    start_epoch = 0
    history: dict[str, list[dict[str, Any]]] = {"steps": [], "epochs": [], "evals": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / STATE_FILE, map_location=device, weights_only=True)
            history = json.loads((Path(directory) / HISTORY_FILE).read_text())
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"][rank].cpu())
        start_epoch = int(state["epoch"]) + 1

    stream = TrainStream(
        job.train_urls, t.batch_size, t.iters_per_epoch, job.augment(), job.mean, job.std,
        rank=rank, world_size=world, seed=t.seed, shuffle_buffer=job.data.shuffle_buffer,
    )  # fmt: skip
    val_stream = EvalStream(job.val_urls, job.mean, job.std, rank=rank, world_size=world)
    tracker = _Tracker(job) if rank == 0 else None

    for epoch in range(start_epoch, t.epochs):
        _maybe_crash(job, epoch, rank)
        stream.set_epoch(epoch)
        summary = train_steps(
            wrapped, train_loader(stream, job.data.loader_workers), optimizer, scheduler,
            t.loss_weights, device, bf16=t.bf16, channels_last=t.channels_last, grad_clip=t.grad_clip,
            on_log=tracker.step if tracker else None, log_every=t.log_every, world_size=world,
        )  # fmt: skip
        iteration = int(scheduler.last_epoch)
        history["epochs"].append({"epoch": epoch, "iteration": iteration, **summary})
        if tracker:
            history["steps"].extend(tracker.flush())
        if (epoch + 1) % t.eval_every_epochs and epoch + 1 != t.epochs:
            continue
        cm = evaluate(
            core, eval_loader(val_stream, job.data.loader_workers), job.num_classes, device
        )
        result = summarize(cm.matrix)
        iou = result["iou_per_class"]
        metrics: dict[str, float] = {
            METRIC: result["miou"],
            "val_pixel_acc": result["pixel_acc"],
            "val_mean_acc": result["mean_acc"],
            "epoch": epoch, "iteration": iteration, "train_loss": summary["loss"],
        }  # fmt: skip
        history["evals"].append({**metrics, "iou_per_class": iou})
        rng_states = _gather(torch.get_rng_state())
        if rank == 0:
            assert tracker is not None
            tracker.evaluation(iteration, metrics, iou)
            with tempfile.TemporaryDirectory() as directory:
                state = {
                    "model": core.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch, "iteration": iteration,
                    "rng": rng_states, "confusion": cm.matrix.cpu(),
                }  # fmt: skip
                torch.save(state, Path(directory) / STATE_FILE)
                (Path(directory) / HISTORY_FILE).write_text(json.dumps(history))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics, checkpoint=None)


def _gather(state: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's RNG state, on every rank (so rank 0 can save them all)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def _maybe_crash(job: TrainJob, epoch: int, rank: int) -> None:
    """Test hook: kill this worker process once, as a lost node would."""
    if job.fault is None:
        return
    at_epoch, at_rank, marker = job.fault
    if epoch == at_epoch and rank == at_rank and not Path(marker).exists():
        Path(marker).write_text("crashed once")
        os._exit(1)


def say(message: str) -> None:
    """A progress line from a Ray worker. Not ``print``: Ray Train patches it to log each line
    twice (to its logger and to the redirected stdout)."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


class _Tracker:
    """Rank 0's MLflow logging: per-step losses/lr/throughput, per-evaluation metrics."""

    def __init__(self, job: TrainJob) -> None:
        self.job = job
        self.pending: list[dict[str, float]] = []
        self.client = None
        if job.tracking_uri and job.mlflow_run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(job.tracking_uri)

    def _log(self, step: int, values: dict[str, float]) -> None:
        if self.client is None:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items() if np.isfinite(v)]
        self.client.log_batch(self.job.mlflow_run_id, metrics=metrics)

    def step(self, iteration: int, values: dict[str, float]) -> None:
        self.pending.append({"iteration": iteration, **values})
        self._log(iteration, values)
        total = self.job.train.max_iters
        say(
            f"[train] iter {iteration}/{total} ({100 * iteration / total:.0f}%) "
            f"loss {values['loss']:.4f} head lr {values['lr']:.4g} "
            f"{values['images_per_s']:.1f} img/s"
        )

    def flush(self) -> list[dict[str, float]]:
        out, self.pending = self.pending, []
        return out

    def evaluation(self, iteration: int, metrics: dict[str, float], iou: list[float]) -> None:
        per_class = {f"val_iou/{name}": v for name, v in zip(self.job.classes, iou, strict=True)}
        self._log(iteration, {k: v for k, v in metrics.items() if k.startswith("val_")} | per_class)
        say(
            f"[train] iter {iteration}: val mIoU {metrics[METRIC]:.4f} "
            f"pixel acc {metrics['val_pixel_acc']:.4f}"
        )


# --- driver ---------------------------------------------------------------------------------


def prepare_job(
    model: ModelParams, data: DataParams, train: TrainParams, tracking_uri: str = ""
) -> tuple[TrainJob, dict[str, Any]]:
    """Check every input before any work starts; returns the job and the shard manifest."""
    manifest = load_manifest(data.shards)
    num_classes = len(manifest["classes"])
    model.to_danet_config(num_classes)  # validates backbone, head, classes
    train_urls = shard_urls(data.shards, manifest, data.train_split)
    val_urls = shard_urls(data.shards, manifest, data.val_split)
    largest = (
        data.base_size if data.base_size else max(manifest["splits"][data.train_split]["max_size"])
    ) * data.scale_max
    if data.crop_size > largest:
        raise ConfigError(
            f"data.crop_size {data.crop_size} is larger than any crop the loader can produce: the "
            f"largest scaled image side is {largest:.0f} (data.base_size or image side x data.scale_max)"
        )
    job = TrainJob(
        model, data, train, num_classes, tuple(manifest["classes"]), tuple(manifest["mean"]),
        tuple(manifest["std"]), tuple(os.path.abspath(u) for u in train_urls),
        tuple(os.path.abspath(u) for u in val_urls), tracking_uri,
    )  # fmt: skip
    return job, manifest


def default_run_name(job: TrainJob, manifest: dict[str, Any]) -> str:
    """``danet-<hash>`` of everything that changes the result: the same config resumes."""
    t = dataclasses.asdict(job.train)
    for key in ("run_name", "storage_path", "out", "ray_address", "max_failures", "log_every"):
        t.pop(key)
    shards = [s["sha256"] for split in manifest["splits"].values() for s in split["shards"]]
    blob = json.dumps(
        [dataclasses.asdict(job.model), dataclasses.asdict(job.data), t, shards], sort_keys=True
    )
    return "danet-" + hashlib.sha256(blob.encode()).hexdigest()[:10]


def connect_ray(address: str, num_cpus: int | None = None) -> None:
    """Join ``address`` (or RAY_ADDRESS); otherwise start a local Ray sized to this machine."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS", "")
    if address and address != "auto":
        _probe(address)
    if ray.is_initialized():
        return
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # The dashboard serves Ray's state API, which Train's placement-group cleanup and Tune's
            # stopping of trials that run Train jobs rely on; it listens on 127.0.0.1 only.
            ray.init(
                num_cpus=num_cpus or os.cpu_count(), include_dashboard=True,
                dashboard_host="127.0.0.1", log_to_driver=True,
            )  # fmt: skip
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ConfigError(
            f"train.ray_address {address!r}: cannot connect to Ray ({str(err).splitlines()[0]})"
        ) from None


def _probe(address: str, timeout: float = 5.0) -> None:
    """Fail fast on an unreachable cluster: ray.init would retry its GCS for minutes."""
    import socket

    host_port = address.split("://", 1)[-1]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"train.ray_address {address!r}: expected host:port, ray://host:port or auto"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise ConfigError(
            f"train.ray_address {address!r}: cannot connect to Ray ({err.strerror or err})"
        ) from None


def run_training(
    model: ModelParams,
    data: DataParams,
    train: TrainParams,
    tracking: MlflowParams,
    fault: tuple[int, int, str] | None = None,
) -> dict[str, Any]:
    """Train (or resume) and write the DVC outputs; returns metrics.json's content."""
    from pipeline import tracking as mlt

    job, manifest = prepare_job(model, data, train)
    uri = mlt.resolve_tracking_uri(tracking.tracking_uri)
    connect_ray(train.ray_address)
    run_name = train.run_name or default_run_name(job, manifest)
    run_id = mlt.start_or_resume_run(
        uri, tracking.experiment or manifest["dataset"], run_name,
        mlt.flat_params(job, manifest), {"dataset": manifest["dataset"]},
    )  # fmt: skip
    job = dataclasses.replace(job, tracking_uri=uri, mlflow_run_id=run_id, fault=fault)
    try:
        result = fit(job, run_name)
    except Exception:
        mlt.end_run(uri, run_id, "FAILED")
        raise
    best, latest = result.get_best_checkpoint(METRIC, "max"), result.checkpoint
    if best is None or latest is None:
        raise RuntimeError(f"run {run_name} reported no checkpoint")
    with best.as_directory() as best_dir, latest.as_directory() as latest_dir:  # local or remote
        return finalize(best_dir, latest_dir, job, manifest, run_name, Path(train.out), tracking)


def storage_uri(path: str) -> str:
    """Ray's storage path: a URI (``s3://``, ``gs://``) as is, a local path made absolute (workers
    and Tune trials run in other working directories)."""
    return path if "://" in path else os.path.abspath(path)


def fit(job: TrainJob, run_name: str, callbacks: list[Any] | None = None) -> Any:
    """One Ray Train run of ``job`` (resumed when ``run_name`` has checkpoints): its Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train = job.train
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(
            num_workers=train.num_workers, use_gpu=train.use_gpu,
            resources_per_worker={"CPU": train.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_uri(train.storage_path),
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=train.checkpoints_to_keep, checkpoint_score_attribute=METRIC,
                checkpoint_score_order="max",
            ),
            callbacks=callbacks,
        ),
    )  # fmt: skip
    return trainer.fit()


def finalize(
    best: str,
    latest: str,
    job: TrainJob,
    manifest: dict[str, Any],
    run_name: str,
    out: Path,
    tracking: MlflowParams,
) -> dict[str, Any]:
    """The best and latest checkpoint folders of a run -> DVC outputs, MLflow artifacts and model."""
    from pipeline import tracking as mlt

    history = json.loads((Path(latest) / HISTORY_FILE).read_text())
    state = torch.load(Path(best) / STATE_FILE, map_location="cpu", weights_only=True)
    metrics, segmenter = write_outputs(
        out, job, manifest, run_name, job.mlflow_run_id, history, state,
        tracking.num_prediction_images,
    )  # fmt: skip
    mlt.finish_run(
        job.tracking_uri, job.mlflow_run_id, job, manifest, out, segmenter, metrics, tracking
    )
    return metrics


def write_outputs(
    out: Path,
    job: TrainJob,
    manifest: dict[str, Any],
    run_name: str,
    run_id: str,
    history: dict[str, Any],
    best_state: dict[str, Any],
    num_prediction_images: int = 4,
) -> tuple[dict[str, Any], Segmenter]:
    """model.pt (best weights), metrics.json, curves CSVs and pictures; the folder is replaced
    atomically. Returns metrics.json's content and the inference module loaded from model.pt."""
    from pipeline.tracking import prediction_overlays
    from pipeline.visualize import (
        plot_confusion_matrix,
        plot_curves,
        save_png,
        write_per_class_iou,
    )

    evals = history["evals"]
    best = max(evals, key=lambda e: e[METRIC])
    final = evals[-1]
    metrics = {
        "best": {
            k: best[k] for k in (METRIC, "val_pixel_acc", "val_mean_acc", "epoch", "iteration")
        },
        "final": {
            k: final[k] for k in (METRIC, "val_pixel_acc", "val_mean_acc", "epoch", "iteration")
        },
        "run_name": run_name,
        "mlflow_run_id": run_id,
        "dataset": manifest["dataset"],
    }
    with atomic_dir(out) as tmp:
        save_model_file(
            tmp / "model.pt", best_state["model"], job.model.to_danet_config(job.num_classes),
            job.classes, manifest["palette"], job.mean, job.std, manifest["dataset"],
            val_miou=best[METRIC], iteration=best["iteration"], mlflow_run_id=run_id,
            lr=job.train.lr, crop_size=job.data.crop_size,
        )  # fmt: skip
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        with open(tmp / "train_curve.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["iteration", "loss", "lr", "images_per_s"])
            for s in history["steps"]:
                writer.writerow(
                    [
                        s["iteration"],
                        f"{s['loss']:.5f}",
                        f"{s['lr']:.6g}",
                        f"{s['images_per_s']:.2f}",
                    ]
                )
        with open(tmp / "val_curve.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["iteration", "miou", "pixel_acc", "mean_acc"])
            for e in evals:
                writer.writerow(
                    [
                        e["iteration"],
                        f"{e[METRIC]:.5f}",
                        f"{e['val_pixel_acc']:.5f}",
                        f"{e['val_mean_acc']:.5f}",
                    ]
                )
        write_per_class_iou(
            tmp / "per_class_iou.csv", zip(job.classes, best["iou_per_class"], strict=True)
        )
        plot_curves(
            history["steps"], evals, tmp / "curves.png", f"{run_name} ({manifest['dataset']})"
        )
        segmenter, _ = load_model_file(tmp / "model.pt")  # also checks the file just written
        grid = prediction_overlays(segmenter, job, manifest, num_prediction_images)
        if grid is not None:
            save_png(grid, tmp / "val_predictions.png")
        plot_confusion_matrix(
            best_state["confusion"].numpy(), job.classes, tmp / "confusion_matrix.png",
            f"{manifest['dataset']} val, best checkpoint (iteration {best['iteration']}), mIoU {best[METRIC]:.3f}",
        )  # fmt: skip
    return metrics, segmenter


def save_model_file(
    path: Path,
    state: dict[str, torch.Tensor],
    config: Any,
    classes: Sequence[str],
    palette: Sequence[Sequence[int]],
    mean: Sequence[float],
    std: Sequence[float],
    dataset: str,
    **meta: Any,
) -> None:
    """The weights with everything needed to use them: architecture, classes, palette, mean/std."""
    torch.save(
        {
            "model": state,
            "model_config": dataclasses.asdict(config),
            "classes": list(classes),
            "palette": [list(c) for c in palette],
            "mean": list(mean),
            "std": list(std),
            "dataset": dataset,
            **meta,
        },
        path,
    )


def load_model_file(path: str | Path) -> tuple[Segmenter, dict[str, Any]]:
    """A ``model.pt`` written by training -> the inference module (eval mode) and its metadata."""
    from danet import DANetConfig

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        cfg = dict(payload["model_config"])
        if cfg.get("multi_grid") is not None:
            cfg["multi_grid"] = tuple(cfg["multi_grid"])
        model = build_danet(DANetConfig(**{**cfg, "pretrained": False, "pretrained_path": None}))
        model.load_state_dict(payload["model"])
    except (
        KeyError,
        RuntimeError,
        OSError,
        EOFError,
        ValueError,
        TypeError,
        UnpicklingError,
    ) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a valid DANet model file ({detail})") from None
    segmenter = Segmenter(model, payload["mean"], payload["std"]).eval()
    return segmenter, payload
