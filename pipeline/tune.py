"""Ray Tune search over the two knobs DANet is most sensitive to: base learning rate and crop size.

Each trial is a function that builds and fits its own ``TorchTrainer`` (the current Train V2 +
Tune API; a trainer passed to ``Tuner`` fails) with Tune's ``TuneReportCallback``, so every
evaluation of the Train run reaches Tune as one result. ASHA stops trials whose val mIoU falls
below the rung's cut-off; the trial's Ray Train job is then torn down through Ray's state API,
which needs ``ray[default]`` and the dashboard (``connect_ray`` starts it for a local Ray).

MLflow: a parent run per search, one nested run per trial (tag ``mlflow.parentRunId``). The
search is named after its config: started again with the same config, ``Tuner.restore`` resumes
it, and each unfinished trial's Train run resumes from its own last checkpoint. The best trial's
model goes to ``tune.out`` exactly as ``danet train`` writes its own, plus ``best_params.yaml``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.atomic import atomic_write_text
from pipeline.config import (
    ConfigError,
    DataParams,
    MlflowParams,
    ModelParams,
    TrainParams,
    _check,
)
from pipeline.train import (
    METRIC,
    TrainJob,
    connect_ray,
    finalize,
    fit,
    prepare_job,
    say,
    storage_uri,
)

TRIAL_TAG = "danet.tune_trial"
TRIAL_MEMORY = 256 * 1024**2  # bytes of Ray's logical "memory" resource per trial driver


@dataclass(frozen=True)
class TuneParams:
    """The search (params.yaml ``tune``); everything else comes from ``model``/``data``/``train``."""

    lr_min: float = 0.003
    lr_max: float = 0.03
    crop_sizes: tuple[int, ...] = (64, 96)
    num_samples: int = 3
    max_concurrent: int = 1
    epochs: int = 8  # per trial; replaces train.epochs
    grace_period: int = 1  # evaluations before ASHA may stop a trial
    reduction_factor: float = 2.0
    seed: int = 0
    name: str = ""  # "" = derived from the config: the same config resumes
    out: str = "outputs/tune"

    def __post_init__(self) -> None:
        _check(
            0 < self.lr_min <= self.lr_max,
            f"tune.lr_min/lr_max must satisfy 0 < min <= max, got {self.lr_min}, {self.lr_max}",
        )
        _check(bool(self.crop_sizes), "tune.crop_sizes must list at least one crop size")
        _check(
            all(c >= 16 for c in self.crop_sizes),
            f"tune.crop_sizes must be >= 16, got {list(self.crop_sizes)}",
        )
        _check(self.num_samples >= 1, f"tune.num_samples must be >= 1, got {self.num_samples}")
        _check(
            self.max_concurrent >= 1, f"tune.max_concurrent must be >= 1, got {self.max_concurrent}"
        )
        _check(self.epochs >= 1, f"tune.epochs must be >= 1, got {self.epochs}")
        _check(self.grace_period >= 1, f"tune.grace_period must be >= 1, got {self.grace_period}")
        _check(
            self.reduction_factor > 1,
            f"tune.reduction_factor must be > 1, got {self.reduction_factor}",
        )


@dataclass(frozen=True)
class SearchJob:
    """What every trial needs, pickled to the trial actors."""

    job: TrainJob  # the base job: lr and crop size are replaced per trial
    search_name: str
    trial_storage: str  # absolute: trials run with another working directory
    experiment: str
    parent_run_id: str
    params: dict[str, str]


def trial_job(search: SearchJob, lr: float, crop_size: int, run_id: str = "") -> TrainJob:
    """The base job with one trial's learning rate and crop size."""
    job = search.job
    return dataclasses.replace(
        job,
        data=dataclasses.replace(job.data, crop_size=int(crop_size)),
        train=dataclasses.replace(job.train, lr=float(lr), storage_path=search.trial_storage),
        mlflow_run_id=run_id,
    )


def trial_run_name(search_name: str, trial_id: str) -> str:
    return f"{search_name}-{trial_id}"


def tune_trial(config: dict[str, Any], search: SearchJob) -> None:
    """One trial: its MLflow run (nested under the search's), then a Ray Train run reporting to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline import tracking as mlt

    lr, crop = float(config["lr"]), int(config["crop_size"])
    run_name = trial_run_name(search.search_name, ray.tune.get_context().get_trial_id())
    base = search.job
    params = {**search.params, "train.lr": str(lr), "data.crop_size": str(crop)}
    tags = {"mlflow.parentRunId": search.parent_run_id, TRIAL_TAG: run_name}
    run_id = mlt.start_or_resume_run(base.tracking_uri, search.experiment, run_name, params, tags)
    say(f"[tune] trial {run_name}: lr {lr:.4g}, crop {crop}")
    fit(trial_job(search, lr, crop, run_id), run_name, callbacks=[TuneReportCallback()])
    mlt.end_run(base.tracking_uri, run_id, "FINISHED")


def search_name(job: TrainJob, tune: TuneParams, manifest: dict[str, Any]) -> str:
    """``tune-<hash>`` of the search space and everything that changes a trial's result."""
    from pipeline.train import default_run_name

    search = dataclasses.asdict(tune)
    search.pop("out")
    search.pop("max_concurrent")
    blob = json.dumps([default_run_name(job, manifest), search], sort_keys=True)
    return "tune-" + hashlib.sha256(blob.encode()).hexdigest()[:10]


def run_search(
    model: ModelParams,
    data: DataParams,
    train: TrainParams,
    tracking: MlflowParams,
    tune: TuneParams,
) -> dict[str, Any]:
    """Run (or resume) the search; write the best trial's outputs; return the search summary."""
    from ray import tune as rt
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from pipeline import tracking as mlt

    largest = max(tune.crop_sizes)  # checked with the shards before any work
    try:
        job, manifest = prepare_job(
            model, dataclasses.replace(data, crop_size=largest),
            dataclasses.replace(train, epochs=tune.epochs),
        )  # fmt: skip
    except ConfigError as err:
        if str(err).startswith("data.crop_size"):
            raise ConfigError(f"tune.crop_sizes: {err}") from None
        raise
    uri = mlt.resolve_tracking_uri(tracking.tracking_uri)
    connect_ray(train.ray_address)
    name = tune.name or search_name(job, tune, manifest)
    storage = storage_uri(train.storage_path)
    experiment = tracking.experiment or manifest["dataset"]
    space_params = {f"tune.{k}": str(v) for k, v in dataclasses.asdict(tune).items()}
    parent = mlt.start_or_resume_run(
        uri, experiment, name, space_params, {"dataset": manifest["dataset"], "danet.kind": "tune"}
    )
    search = SearchJob(
        dataclasses.replace(job, tracking_uri=uri), name, f"{storage}/{name}-trials",
        experiment, parent, mlt.flat_params(job, manifest),
    )  # fmt: skip
    evaluations = math.ceil(tune.epochs / train.eval_every_epochs)
    param_space = {
        "lr": rt.loguniform(tune.lr_min, tune.lr_max),
        "crop_size": rt.choice(list(tune.crop_sizes)),
    }
    # The trial only drives its Train run: the Train workers hold the CPUs/GPUs. Ray refuses an
    # empty request, so the trial asks for memory alone.
    trainable = rt.with_resources(
        rt.with_parameters(tune_trial, search=search), {"CPU": 0, "memory": TRIAL_MEMORY}
    )
    path = f"{storage}/{name}"
    if rt.Tuner.can_restore(path):
        print(f"[tune] resuming search {name} from {path}", flush=True)
        tuner = rt.Tuner.restore(path, trainable, resume_errored=True)
    else:
        tuner = rt.Tuner(
            trainable,
            param_space=param_space,
            tune_config=rt.TuneConfig(
                metric=METRIC, mode="max", num_samples=tune.num_samples,
                max_concurrent_trials=tune.max_concurrent,
                scheduler=ASHAScheduler(
                    time_attr="training_iteration", max_t=evaluations,
                    grace_period=min(tune.grace_period, evaluations),
                    reduction_factor=tune.reduction_factor,
                ),
                search_alg=BasicVariantGenerator(
                    random_state=tune.seed, max_concurrent=tune.max_concurrent
                ),
                trial_dirname_creator=lambda trial: trial.trial_id,
            ),
            run_config=rt.RunConfig(name=name, storage_path=storage),
        )  # fmt: skip
    try:
        grid = tuner.fit()
    except Exception:
        mlt.end_run(uri, parent, "FAILED")
        raise
    return summarize_search(grid, search, manifest, evaluations, tracking, Path(tune.out))


def summarize_search(
    grid: Any,
    search: SearchJob,
    manifest: dict[str, Any],
    evaluations: int,
    tracking: MlflowParams,
    out: Path,
) -> dict[str, Any]:
    """Trials -> table, MLflow statuses, the best trial's outputs and ``best_params.yaml``."""
    from mlflow.tracking import MlflowClient

    from pipeline import tracking as mlt

    uri = search.job.tracking_uri
    client = MlflowClient(uri)
    trials: list[dict[str, Any]] = []
    for result in sorted(grid, key=lambda r: Path(r.path).name):  # trial order, restored or not
        cfg, history = result.config, result.metrics_dataframe
        trial_id = result.metrics.get("trial_id") if result.metrics else None
        trial_id = trial_id or Path(result.path).name
        scores = history[METRIC].tolist() if history is not None and METRIC in history else []
        best_index = max(range(len(scores)), key=scores.__getitem__) if scores else None
        trial: dict[str, Any] = {
            "trial_id": trial_id,
            "run_name": trial_run_name(search.search_name, trial_id),
            "lr": float(cfg["lr"]),
            "crop_size": int(cfg["crop_size"]),
            "evaluations": len(scores),
            "best_val_miou": float(scores[best_index]) if best_index is not None else float("nan"),
            "stopped_early": result.error is None and 0 < len(scores) < evaluations,
            "error": str(result.error).strip().splitlines()[0] if result.error else "",
            "best_checkpoint": str(history["checkpoint_path"].iloc[best_index])
            if best_index is not None
            else "",
            "latest_checkpoint": str(history["checkpoint_path"].iloc[-1]) if scores else "",
        }
        trials.append(trial)
        _close_trial_run(client, search, trial)
    done = [t for t in trials if t["evaluations"] and not math.isnan(t["best_val_miou"])]
    if not done:
        mlt.end_run(uri, search.parent_run_id, "FAILED")
        first = next((t["error"] for t in trials if t["error"]), "no trial reported a result")
        raise RuntimeError(f"tune: every trial failed ({first})")
    best = max(done, key=lambda t: t["best_val_miou"])
    job = trial_job(search, best["lr"], best["crop_size"], _trial_run_id(client, search, best))
    best_ckpt, latest_ckpt = (
        trial_checkpoint(search, best["run_name"], best[key])
        for key in ("best_checkpoint", "latest_checkpoint")
    )
    with best_ckpt.as_directory() as best_dir:
        try:
            with latest_ckpt.as_directory() as latest_dir:
                metrics = finalize(
                    best_dir, latest_dir, job, manifest, best["run_name"], out, tracking
                )
        except FileNotFoundError:  # the latest checkpoint was not kept: the best one's history
            metrics = finalize(best_dir, best_dir, job, manifest, best["run_name"], out, tracking)
    summary = {
        "search": search.search_name,
        "best": {k: best[k] for k in ("trial_id", "run_name", "lr", "crop_size", "best_val_miou")},
        "trials": trials,
        "mlflow_parent_run_id": search.parent_run_id,
        "best_metrics": metrics,
    }
    write_summary(out, summary)
    with mlt.tracking_uri(uri):
        import mlflow

        with mlflow.start_run(run_id=search.parent_run_id):
            mlflow.log_metric("best_val_miou", best["best_val_miou"])
            mlflow.set_tags(
                {
                    "best_trial": best["run_name"],
                    "best_lr": f"{best['lr']:.6g}",
                    "best_crop_size": str(best["crop_size"]),
                }
            )
            mlflow.log_artifact(str(out / "best_params.yaml"))
            mlflow.log_artifact(str(out / "trials.json"))
    return summary


def trial_checkpoint(search: SearchJob, run_name: str, reported: str) -> Any:
    """A checkpoint a trial reported, on the search's storage (local folder or bucket URI)."""
    from ray.train import Checkpoint

    return Checkpoint(f"{search.trial_storage}/{run_name}/{Path(reported).name}")


def _trial_run_id(client: Any, search: SearchJob, trial: dict[str, Any]) -> str:
    from pipeline.tracking import RUN_NAME_TAG

    exp = client.get_experiment_by_name(search.experiment)
    runs = client.search_runs(
        [exp.experiment_id], f"tags.`{RUN_NAME_TAG}` = '{trial['run_name']}'", max_results=1
    )
    return runs[0].info.run_id if runs else ""


def _close_trial_run(client: Any, search: SearchJob, trial: dict[str, Any]) -> None:
    """A trial ASHA stopped was killed mid-run: mark its MLflow run and say why."""
    run_id = _trial_run_id(client, search, trial)
    if not run_id:
        return
    client.set_tag(run_id, "tune.stopped_early", str(trial["stopped_early"]).lower())
    client.set_tag(run_id, "tune.best_val_miou", f"{trial['best_val_miou']:.4f}")
    if trial["error"]:
        client.set_terminated(run_id, "FAILED")
    elif client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, "KILLED" if trial["stopped_early"] else "FINISHED")


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """``best_params.yaml`` (the override to train with) and ``trials.json`` next to the model."""
    best = summary["best"]
    params = {
        "train": {"lr": float(f"{best['lr']:.6g}")},
        "data": {"crop_size": best["crop_size"]},
        "val_miou": round(best["best_val_miou"], 6),
        "trial": best["run_name"],
    }
    for name, text in (
        ("best_params.yaml", yaml.safe_dump(params, sort_keys=False)),
        ("trials.json", json.dumps(summary["trials"], indent=2) + "\n"),
    ):
        atomic_write_text(out / name, text)


def format_trials(summary: dict[str, Any]) -> str:
    lines = [f"{'trial':<12} {'lr':>9} {'crop':>5} {'evals':>5} {'best mIoU':>9}  status"]
    for t in summary["trials"]:
        status = t["error"] or ("stopped early (ASHA)" if t["stopped_early"] else "completed")
        mark = " <- best" if t["trial_id"] == summary["best"]["trial_id"] else ""
        lines.append(
            f"{t['trial_id']:<12} {t['lr']:9.4g} {t['crop_size']:5d} {t['evaluations']:5d} "
            f"{t['best_val_miou']:9.4f}  {status}{mark}"
        )
    return "\n".join(lines)
