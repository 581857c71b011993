"""Register an evaluated model in the MLflow model registry; move ``champion`` only on a win.

Each registration creates a new version of ``danet-<dataset>`` (or ``register.name``), tagged with
the dataset, the shard manifest's hash, the git commit, the val mIoU and the evaluation protocol.
The alias ``champion`` moves to it only if it strictly beats the current champion on the same
dataset and protocol; otherwise it gets ``challenger``. A champion is never demoted by a worse
or incomparable model. Aliases, not the deprecated stages.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

from pipeline.artifacts.modelfile import read_model_info
from pipeline.artifacts.tracking import logged_model_uri
from pipeline.config import ConfigError, RegisterParams
from pipeline.outputs import atomic_write_text

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def mlflow_model_uri(model_uri: str) -> tuple[str, str]:
    """An MLflow model URI and its run id for an evaluated model (a model.pt names its run)."""
    import mlflow

    if model_uri.startswith(("models:/", "runs:/")):
        info = mlflow.models.get_model_info(model_uri)
        return model_uri, info.run_id or ""
    run_id = str(read_model_info(model_uri).meta.get("mlflow_run_id", ""))
    uri = logged_model_uri(run_id) if run_id else None
    if uri is None:
        raise ConfigError(
            f"{model_uri}: no MLflow model was logged for it (mlflow.log_model: false?)"
        )
    return uri, run_id


def decide(champion_tags: dict[str, str] | None, tags: dict[str, str]) -> tuple[str, str]:
    """``(alias, reason)`` for a new version with ``tags`` against the champion's tags."""
    if champion_tags is None:
        return CHAMPION, "no champion yet"
    for key in ("dataset", "eval_protocol"):
        if champion_tags.get(key) != tags[key]:
            return (
                CHALLENGER,
                f"champion has {key} {champion_tags.get(key)!r}, not {tags[key]!r}: not comparable",
            )
    old, new = float(champion_tags.get("val_miou", "nan")), float(tags["val_miou"])
    if new > old:
        return CHAMPION, f"val mIoU {new:.4f} beats the champion's {old:.4f}"
    return CHALLENGER, f"val mIoU {new:.4f} does not beat the champion's {old:.4f}"


def find_version(client: Any, name: str, tags: dict[str, str]) -> Any:
    """A version of ``name`` from the same run, protocol and score (a repeated registration)."""
    from mlflow.exceptions import MlflowException

    if not tags["source_run_id"]:
        return None
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    for v in versions:
        if all(v.tags.get(k) == tags[k] for k in ("source_run_id", "eval_protocol", "val_miou")):
            return v
    return None


def register(params: RegisterParams, tracking_uri: str) -> dict[str, Any]:
    """Register the model of ``params.eval_metrics``; returns (and writes) what was decided."""
    from mlflow.tracking import MlflowClient

    from pipeline.artifacts.tracking import tracking_uri as using

    path = Path(params.eval_metrics)
    if not path.is_file():
        raise ConfigError(f"{path}: evaluation metrics do not exist (run danet evaluate)")
    evaluation = json.loads(path.read_text())
    with using(tracking_uri):
        return _register(params, evaluation, MlflowClient(tracking_uri))


def _register(params: RegisterParams, evaluation: dict[str, Any], client: Any) -> dict[str, Any]:
    import mlflow
    from mlflow.exceptions import MlflowException

    name = params.name or f"danet-{evaluation['dataset']}"
    model_uri, run_id = mlflow_model_uri(evaluation["model_uri"])
    tags = {
        "dataset": evaluation["dataset"],
        "split": evaluation.get("split", ""),
        "data_sha256": evaluation.get("split_sha256", ""),
        "git_commit": git_commit(),
        "val_miou": f"{evaluation['miou']:.6f}",
        "eval_protocol": evaluation["protocol"],
        "source_run_id": run_id,
    }
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
        champion_tags: dict[str, str] | None = dict(champion.tags)
        champion_version: str | None = str(champion.version)
    except MlflowException:
        champion_tags, champion_version = None, None
    existing = find_version(client, name, tags)
    if existing is not None:  # the same model, evaluated the same way: no second version
        version = existing
        log.info("already registered as %s version %s", name, version.version)
    else:
        version = mlflow.register_model(model_uri, name, tags=tags)
    if champion_version == str(version.version):
        alias, reason = CHAMPION, "already the champion"
    else:
        alias, reason = decide(champion_tags, tags)
        client.set_registered_model_alias(name, alias, version.version)
    if alias == CHAMPION:
        champion_version, champion_tags = version.version, tags
    result = {
        "name": name,
        "version": str(version.version),
        "alias": alias,
        "reason": reason,
        "val_miou": evaluation["miou"],
        "eval_protocol": evaluation["protocol"],
        "champion_version": str(champion_version),
        "champion_val_miou": float(champion_tags["val_miou"]) if champion_tags else None,
        "champion_uri": f"models:/{name}@{CHAMPION}",
    }
    atomic_write_text(Path(params.out), json.dumps(result, indent=2) + "\n")
    return result
