"""What a finished search leaves: each trial's record and MLflow status, the best trial's
outputs in ``tune.out`` (as ``danet train`` writes its own), ``best_params.yaml`` (a params file),
``search.json`` (which search and trial it came from) and ``trials.json``, and the typed
``SearchSummary`` that ``danet tune`` prints. ``danet train --refit tune.out`` reads the first
two back (``read_refit``): the best params over params.yaml, the run linked to the search."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import TrainingFailed, first_line
from pipeline.notes import NOTE_TAG, SHARED_VIEW, run_link, trials_view, trials_view_link
from pipeline.outputs import atomic_write_text
from pipeline.sections import MlflowParams
from pipeline.training.driver import finalize
from pipeline.training.records import VAL_MIOU
from pipeline.training.results import RunSummary
from pipeline.training.trial import (
    SearchJob,
    describe_values,
    plain,
    trial_job,
    trial_run_name,
    trial_title,
)


@dataclass
class Trial:
    """One trial as trials.json lists it."""

    trial_id: str
    run_name: str
    values: dict[str, Any]  # the trial's draw from tune.space: dotted params key -> value
    evaluations: int
    best_val_miou: float
    stopped_early: bool
    error: str
    latest_checkpoint: str
    best_iteration: int = 0  # the iteration of its best evaluation
    epochs: int = 0  # epochs it trained before it ended (or ASHA stopped it)


@dataclass(frozen=True)
class SearchSummary:
    """A finished search: every trial, the best one, and the scores of its model in tune.out."""

    search: str
    best: Trial
    trials: list[Trial]
    mlflow_parent_run_id: str
    best_metrics: RunSummary

    def describe(self, out: str) -> str:
        """What ``danet tune`` prints: the trials' table, then the best."""
        best = self.best
        return (
            f"{format_trials(self.trials, best)}\nsearch {self.search}: best "
            f"{describe_values(best.values)}, val mIoU {best.best_val_miou:.4f} -> "
            f"{out}/best_params.yaml"
        )


def trial_record(result: Any, search: SearchJob, evaluations: int) -> Trial:
    """A Tune result -> its Trial (trial order is the results' folder order, restored or not)."""
    history = result.metrics_dataframe
    trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
    scores = history[VAL_MIOU].tolist() if history is not None and VAL_MIOU in history else []
    best_at = scores.index(max(scores)) if scores else -1
    return Trial(
        trial_id=trial_id,
        run_name=trial_run_name(search.search_name, trial_id),
        values={key: plain(value) for key, value in result.config.items()},
        evaluations=len(scores),
        best_val_miou=max(scores) if scores else float("nan"),
        stopped_early=result.error is None and 0 < len(scores) < evaluations,
        error=first_line(result.error) if result.error else "",
        latest_checkpoint=str(history["checkpoint_path"].iloc[-1]) if scores else "",
        best_iteration=int(history["iteration"].iloc[best_at]) if scores else 0,
        epochs=int(history["epoch"].iloc[-1]) + 1 if scores else 0,  # 0-based in the record
    )


def summarize_search(
    trials: list[Trial], search: SearchJob, tracking: MlflowParams, out: Path
) -> SearchSummary:
    """Trials -> MLflow statuses, the best trial's outputs, ``best_params.yaml`` and ``trials.json``."""
    from mlflow.tracking import MlflowClient
    from ray.train import Checkpoint

    from pipeline import mlflowstore as mlt

    client = MlflowClient(search.job.tracking_uri)
    for trial in trials:
        _close_trial_run(client, search, trial)
    done = [t for t in trials if t.evaluations and not math.isnan(t.best_val_miou)]
    if not done:
        mlt.end_run(search.job.tracking_uri, search.parent_run_id, "FAILED")
        first = next((t.error for t in trials if t.error), "no trial reported a result")
        raise TrainingFailed(f"tune: every trial failed ({first}); nothing was written")
    best = max(done, key=lambda t: t.best_val_miou)
    job = trial_job(search, best.values, _trial_run_id(client, search, best))
    checkpoint = Checkpoint(
        f"{search.trial_storage}/{best.run_name}/{Path(best.latest_checkpoint).name}"
    )
    with checkpoint.as_directory() as latest:  # every checkpoint holds the trial's best weights
        metrics = finalize(Path(latest), job, best.run_name, out, tracking)
    summary = SearchSummary(search.search_name, best, trials, search.parent_run_id, metrics)
    origin = {
        "search": search.search_name,
        "search_run_id": search.parent_run_id,
        "best_trial": best.run_name,
        "best_trial_run_id": job.mlflow_run_id,
        "best_val_miou": best.best_val_miou,
        "values": best.values,
    }
    write_summary(out, best, trials, job, origin)
    log_search(search, best, out, trials)
    return summary


def log_search(search: SearchJob, best: Trial, out: Path, trials: list[Trial]) -> None:
    """The search's run: its best score, the best trial (by name and run), its files and its
    description: the trials as a table, linked to their runs."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.mlflowstore import tracking_uri

    client = MlflowClient(search.job.tracking_uri)
    runs = {t.run_name: _trial_run_id(client, search, t) for t in trials}
    with (
        tracking_uri(search.job.tracking_uri),
        mlflow.start_run(run_id=search.parent_run_id) as run,
    ):
        mlflow.log_metric("best_val_miou", best.best_val_miou)
        tags = {
            "best_trial": trial_title(best.run_name),
            "best_trial_run_id": runs.get(best.run_name, ""),
        }
        tags.update({f"best.{key}": str(value) for key, value in best.values.items()})
        experiment = run.info.experiment_id
        view = trials_view(search.parent_run_id, list(best.values))
        client.set_experiment_tag(experiment, SHARED_VIEW + search.search_name, json.dumps(view))
        tags[NOTE_TAG] = search_note(search, best, trials, runs, experiment)
        mlflow.set_tags({k: v for k, v in tags.items() if v})
        mlflow.log_artifact(str(out / "best_params.yaml"))
        mlflow.log_artifact(str(out / "trials.json"))


def search_note(
    search: SearchJob, best: Trial, trials: list[Trial], runs: dict[str, str], experiment: str
) -> str:
    """The search's description: what it searched, each trial's values and scores (a row each,
    linked to its run), the best, and how to train it in full."""
    keys = list(best.values)
    head = ["trial", *(f"`{k}`" for k in keys), "best val mIoU", "epochs", "ended"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in trials:
        name = trial_title(t.run_name) + (" (best)" if t is best else "")
        cells = [run_link(experiment, runs[t.run_name], name) if runs.get(t.run_name) else name]
        cells += [_cell(t.values.get(k)) for k in keys]
        ended = t.error or ("stopped early (ASHA)" if t.stopped_early else "completed")
        cells += [_cell(t.best_val_miou), str(t.epochs), ended]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(
        [
            f"### Search {search.search_name}: best val mIoU **{best.best_val_miou:.4f}**",
            "",
            f"{len(trials)} trials over {', '.join(f'`{k}`' for k in keys)}, each scored by its "
            "own validation (`best_val_miou`, whole image); the best is trained in full by "
            "`danet train --refit` (tag `danet.refit_run_id` once it has run).",
            "",
            *rows,
            "",
            f"[The trials side by side]({trials_view_link(experiment, search.search_name)}) in "
            "the runs table, their searched values and scores as columns, best first.",
        ]
    )


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _trial_run_id(client: Any, search: SearchJob, trial: Trial) -> str:
    from pipeline.mlflowstore import named_run

    exp = client.get_experiment_by_name(search.experiment)
    run = named_run(client, exp.experiment_id, trial.run_name) if exp is not None else None
    return run.info.run_id if run is not None else ""


def _close_trial_run(client: Any, search: SearchJob, trial: Trial) -> None:
    """A trial's MLflow run: FINISHED (ASHA's stop tagged ``tune.stopped_early``) or FAILED."""
    run_id = _trial_run_id(client, search, trial)
    if not run_id:
        return
    client.set_tag(run_id, "tune.stopped_early", str(trial.stopped_early).lower())
    # metrics: the runs table's and the comparison's columns (no NaN: a trial without a score
    # has none of them)
    if not math.isnan(trial.best_val_miou):
        metrics = {
            "best_val_miou": trial.best_val_miou,
            "best_iteration": trial.best_iteration,
            "epochs_trained": trial.epochs,
            "stopped_early": int(trial.stopped_early),
        }
        for key, value in metrics.items():
            client.log_metric(run_id, key, float(value))
    status = client.get_run(run_id).info.status
    if trial.error:
        client.set_terminated(run_id, "FAILED")
    elif status == "RUNNING" or trial.stopped_early:  # stopped by ASHA is a finished run, not a
        client.set_terminated(run_id, "FINISHED")  # crash: its tag tune.stopped_early says so


def best_params(values: dict[str, Any], job: Any = None) -> dict[str, Any]:
    """The searched values as a params mapping: ``{"train.lr": 0.01}`` -> ``{"train": {"lr":
    0.01}}``; a key of a mapping param (``train.loss_weights.pam``) writes that whole mapping as
    the trial ran it (``job``'s sections), so the file is complete on its own."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        section, name, *sub = key.split(".")
        if sub and job is not None:
            value = dict(getattr(getattr(job, section), name))
        elif sub:
            value = {sub[0]: value}
        out.setdefault(section, {})[name] = value  # exact: YAML writes a float's repr
    return out


def write_summary(
    out: Path,
    best: Trial,
    trials: list[Trial],
    job: Any = None,
    origin: dict[str, Any] | None = None,
) -> None:
    """``best_params.yaml`` (the best trial's params: a params file of its own, or the values to
    copy into params.yaml), ``search.json`` (``origin``: the search and trial) and
    ``trials.json`` next to the model."""
    header = (  # comments: the file stays a params file (danet train --params best_params.yaml)
        f"# the best trial of the search: {best.run_name}, val mIoU {best.best_val_miou:.6f}\n"
    )
    params = best_params(best.values, job)
    for name, text in (
        ("best_params.yaml", header + yaml.safe_dump(params, sort_keys=False)),
        ("trials.json", json.dumps([asdict(t) for t in trials], indent=2) + "\n"),
        ("search.json", json.dumps(origin or {}, indent=2) + "\n"),
    ):
        atomic_write_text(out / name, text)


SEARCH_FILES = ("best_params.yaml", "trials.json", "search.json")  # beside the model in tune.out
REFIT_TAGS = {  # search.json key -> the refit run's tag
    "search": "danet.refit_of_search",
    "search_run_id": "danet.search_run_id",
    "best_trial": "danet.refit_of_trial",
    "best_trial_run_id": "danet.refit_of_trial_run_id",  # absent from earlier search.json
}
REFIT_REQUIRED = ("search", "search_run_id", "best_trial")


def read_refit(folder: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """A finished search's folder (``tune.out``) -> (its best params, as sections' values, for
    ``load_params``'s overlay; the tags that link the refit run to the search and trial).

    best_params.yaml may set only the keys the search searched (search.json's ``values``): a
    key it never searched (``train.epochs``, ``mlflow.experiment``) belongs in params.yaml or
    ``--set``. It must set every searched key to the value the winning trial trained
    (search.json's, compared exactly): a key left out would train params.yaml's value, an
    edited one a value no trial trained, both tagged as the trial's refit. A float that
    search.json holds exactly and best_params.yaml rounded (files of earlier versions wrote 6
    digits) is the trial's exact value."""
    from pipeline.config import ConfigError
    from pipeline.paramsfile import read_yaml

    files = [folder / "best_params.yaml", folder / "search.json"]
    if missing := [f for f in files if not f.is_file()]:
        raise ConfigError(f"--refit {folder}: no {missing[0].name} (run danet tune first)")
    overlay = read_yaml(files[0])
    try:
        origin = json.loads(files[1].read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"--refit {files[1]}: not written by danet tune ({err})") from None
    if not isinstance(origin, dict) or not all(k in origin for k in REFIT_REQUIRED):
        raise ConfigError(f"--refit {files[1]}: not written by danet tune (no search named)")
    values = origin.get("values")
    if not isinstance(values, dict) or not values:
        raise ConfigError(f"--refit {files[1]}: not written by danet tune (no searched values)")
    overlay = _searched_only(overlay, values, files[0])
    _check_trained(overlay, values, files)
    return overlay, {tag: str(origin[key]) for key, tag in REFIT_TAGS.items() if origin.get(key)}


def _searched_only(overlay: dict[str, Any], values: dict[str, Any], path: Path) -> dict[str, Any]:
    """best_params.yaml's sections, each key one the search searched; rounded floats exact."""
    from pipeline.config import ConfigError

    searched = {".".join(key.split(".")[:2]): key for key in values}  # train.loss_weights.pam
    for section, entries in overlay.items():
        if not isinstance(entries, dict):
            raise ConfigError(f"--refit {path}: {section} must be a mapping of params")
        for name, value in entries.items():
            key = f"{section}.{name}"
            if key not in searched:
                raise ConfigError(
                    f"--refit {path}: {key} was not searched (the search varied "
                    f"{', '.join(sorted(values))}): set it in params.yaml or with --set"
                )
            exact = values.get(key)
            if (
                isinstance(exact, float)
                and isinstance(value, float)
                and value != exact
                and value == float(f"{exact:.6g}")
            ):
                entries[name] = exact
    return overlay


_MISSING = object()


def _check_trained(overlay: dict[str, Any], values: dict[str, Any], files: list[Path]) -> None:
    """Every searched key of best_params.yaml (``files[0]``) holds the value the winning trial
    trained (search.json's, ``files[1]``), nothing left out. Numbers compare by value (a
    mapping param's whole mapping is written as the trial's config held it: 1.0 for 1), a
    flag is not a number."""
    from pipeline.config import ConfigError

    for key, trained in values.items():
        value: Any = overlay
        for part in key.split("."):  # train.loss_weights.pam: into the mapping
            value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
        if (
            value is _MISSING
            or value != trained
            or isinstance(value, bool) != isinstance(trained, bool)
        ):
            found = "missing" if value is _MISSING else f"{value!r}"
            raise ConfigError(
                f"--refit {files[0]}: {key} is {found} but the winning trial trained {trained!r} "
                f"({files[1].name}): restore it, or train those params with --params instead of "
                "--refit"
            )


def format_trials(trials: list[Trial], best: Trial) -> str:
    keys = list(best.values)
    width = {k: max(len(k), 9) for k in keys}

    def cell(value: Any, key: str) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return f"{text:>{width[key]}}"

    head = " ".join(f"{k:>{width[k]}}" for k in keys)
    lines = [f"{'trial':<12} {head} {'evals':>5} {'best mIoU':>9}  status"]
    for t in trials:
        status = t.error or ("stopped early (ASHA)" if t.stopped_early else "completed")
        mark = " <- best" if t.trial_id == best.trial_id else ""
        row = " ".join(cell(t.values.get(k), k) for k in keys)
        lines.append(
            f"{t.trial_id:<12} {row} {t.evaluations:5d} {t.best_val_miou:9.4f}  {status}{mark}"
        )
    return "\n".join(lines)
