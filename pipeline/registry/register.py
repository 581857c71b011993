"""Register an evaluated model in the MLflow model registry; move ``champion`` only on a win.

Each registration creates a version of ``danet-<dataset>`` (or ``register.name``) tagged with
what makes its score comparable -- the dataset, the split, the digest of the shards actually
evaluated, the evaluation protocol -- and the score, the git commit and the source run. The alias
``champion`` moves to it only when it strictly beats the champion on a comparable evaluation;
otherwise it gets ``challenger`` and a ``reason`` tag says why. The champion never moves to a
lower, equal or non-comparable score. Aliases, not the deprecated stages.

All or nothing: the output file's folder is checked before MLflow is touched, and if anything
fails after the version or an alias changed, the version is deleted and the aliases are put back.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.codebase import git_state
from pipeline.config import ConfigError, Params
from pipeline.errors import DataError, ServiceError, first_line
from pipeline.evaluation.report import REPORT, Evaluation
from pipeline.locks import exclusive
from pipeline.modelrefs import registry_uri
from pipeline.notes import NOTE_TAG
from pipeline.outputs import atomic_file
from pipeline.registry.logged import (
    TORCH,
    Attachment,
    attach_evaluation,
    describe_version,
    mlflow_model_uri,
    read_attachments,
    served_onnx,
)
from pipeline.schema import check_name
from pipeline.scores import LEGACY_PROTOCOL_SCORE, PROTOCOL_SCORE, beats
from pipeline.sections import RegisterParams

log = logging.getLogger(__name__)
CHAMPION, CHALLENGER = "champion", "challenger"
REGISTERED = "**Registered**"  # the part of a run's description that registering writes
COMPARABLE = ("dataset", "split", "data_sha256", "eval_protocol")  # tags that must be equal
SAME_MODEL = ("source_run_id", PROTOCOL_SCORE, *COMPARABLE)  # one model, one evaluation


@dataclass(frozen=True)
class Registration:
    """registered.json: what was registered and what the champion is now."""

    name: str
    version: str
    alias: str
    reason: str
    eval_miou: float  # the evaluate stage's protocol score (pipeline/scores.py)
    eval_protocol: str
    champion_version: str
    champion_eval_miou: float
    champion_uri: str
    runtimes: str = TORCH  # what the version serves: torch, onnx, onnx-int8 (params.runtime)

    def describe(self) -> str:
        """What ``danet register`` prints."""
        return (
            f"{self.name} version {self.version} -> @{self.alias}: {self.reason}\n"
            f"serves: {self.runtimes.replace(',', ', ')} (request params.runtime)\n"
            f"champion: {self.champion_uri} (version {self.champion_version}, "
            f"eval mIoU {self.champion_eval_miou:.4f})"
        )


def summary(p: Params, tracking_uri: str) -> str:
    """What the pipeline produced (``danet summary``): the champion, its score, the pictures to
    look at and the command that opens the MLflow UI on this store."""
    import os
    import sys

    result = read_registration(Path(p.register.out))
    ev = Path(p.evaluate.out)
    mlflow = Path(sys.executable).parent / "mlflow"  # this environment's, wherever it is
    shown = os.path.relpath(mlflow) if mlflow.is_relative_to(Path.cwd()) else str(mlflow)
    return "\n".join(
        [
            f"champion: {result.champion_uri} = {result.name} version {result.champion_version}",
            f"  eval mIoU {result.champion_eval_miou:.4f} on {result.eval_protocol} (danet evaluate)",
            f"  this run: version {result.version} -> @{result.alias} ({result.reason})",
            f"prediction overlays: {ev / REPORT['predictions']}",
            f"confusion matrix:    {ev / REPORT['confusion_matrix']}",
            f"MLflow UI: {shown} ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000",
        ]
    )


def version_tags(
    evaluation: Evaluation, run_id: str, onnx: dict[str, str] | None = None
) -> dict[str, str]:
    """A version's tags; ``onnx`` maps the attached runtimes to their files' sha256."""
    onnx = onnx or {}
    return {
        "dataset": evaluation.dataset,
        "split": evaluation.split,
        "data_sha256": evaluation.split_sha256,
        "eval_protocol": evaluation.protocol,
        PROTOCOL_SCORE: f"{evaluation.miou:.6f}",
        "git_commit": git_state()[0],
        "source_run_id": run_id,
        "runtimes": ",".join([TORCH, *onnx]),
        # no empty tag: a version without ONNX files has none
        **({"onnx_sha256": ",".join(f"{k}={v}" for k, v in onnx.items())} if onnx else {}),
    }


def decide(champion_tags: dict[str, str] | None, tags: dict[str, str]) -> tuple[str, str]:
    """``(alias, reason)`` for a new version with ``tags`` against the champion's tags."""
    if champion_tags is None:
        return CHAMPION, "no champion yet"
    text = protocol_score(champion_tags)
    old = _score(text)
    if not math.isfinite(old):  # registered before scores were checked: no score to defend
        return CHAMPION, f"the champion's eval mIoU {text!r} is not a number"
    same = tags.get("source_run_id") and all(
        (protocol_score(champion_tags) if k == PROTOCOL_SCORE else champion_tags.get(k))
        == tags.get(k)
        for k in SAME_MODEL
    )
    if same:  # the champion's model and evaluation, registered again (with other ONNX files)
        had = set(champion_tags.get("runtimes", TORCH).split(","))
        if had <= set(tags["runtimes"].split(",")):
            return CHAMPION, f"the champion's model and evaluation, served by {tags['runtimes']}"
        return (
            CHALLENGER,
            f"the champion's model and evaluation, served by {champion_tags.get('runtimes')} "
            f"there and {tags['runtimes']} here",
        )
    for key in COMPARABLE:
        if champion_tags.get(key) != tags[key]:
            return (
                CHALLENGER,
                f"not comparable: the champion has {key} {champion_tags.get(key)!r}, this {tags[key]!r}",
            )
    new = float(tags[PROTOCOL_SCORE])
    if beats(new, old):
        return CHAMPION, f"eval mIoU {new:.4f} beats the champion's {old:.4f}"
    return CHALLENGER, f"eval mIoU {new:.4f} does not beat the champion's {old:.4f}"


def protocol_score(tags: dict[str, str]) -> str | None:
    """A version's eval mIoU tag (``val_miou`` on versions registered before it was renamed)."""
    return tags.get(PROTOCOL_SCORE, tags.get(LEGACY_PROTOCOL_SCORE))


def _score(text: str | None) -> float:
    try:
        return float(text) if text is not None else math.nan
    except ValueError:
        return math.nan


def find_version(client: Any, name: str, tags: dict[str, str]) -> Any:
    """A version of ``name`` with the same run and evaluation (a repeated registration)."""
    from mlflow.exceptions import MlflowException

    if not tags["source_run_id"]:
        return None
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    keys = (*SAME_MODEL, "onnx_sha256")
    found = (v for v in versions if all(v.tags.get(k, "") == tags.get(k, "") for k in keys))
    return next(found, None)


def alias_version(client: Any, name: str, alias: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def register(params: RegisterParams, tracking_uri: str) -> Registration:
    """Register the model of ``params.eval_metrics``; returns (and writes) what was decided."""
    from mlflow.tracking import MlflowClient

    from pipeline.mlflowstore import sqlite_database
    from pipeline.mlflowstore import tracking_uri as using

    evaluation = Evaluation.read(Path(params.eval_metrics))
    attachments = read_attachments(params.onnx)  # each file checked before MLflow is touched
    store = str(sqlite_database(tracking_uri) or tracking_uri)
    with (
        # one register at a time on this host; a server's registry: the champion's compare-and-set
        exclusive(store, f"the registry of {tracking_uri}", wait=True, lease=False),
        atomic_file(Path(params.out)) as tmp,  # the folder is writable first; written in the lock
        using(tracking_uri),
    ):
        client = MlflowClient(tracking_uri)
        undo: list[tuple[str, Any]] = []
        try:
            result = _register(params, evaluation, attachments, client, undo)
            tmp.write_text(json.dumps(asdict(result), indent=2) + "\n")
        except BaseException:
            rollback(client, params.name or f"danet-{evaluation.dataset}", undo)
            raise
    return result


def rollback(client: Any, name: str, undo: list[tuple[str, Any]]) -> None:
    """Put back what a failed registration changed, newest change first."""
    for kind, value in reversed(undo):
        try:
            if kind == "version":
                client.delete_model_version(name, value)
            elif kind == "alias":
                alias, previous = value
                if previous is None:
                    client.delete_registered_model_alias(name, alias)
                else:
                    client.set_registered_model_alias(name, alias, previous)
        except Exception as err:  # best effort: report what could not be undone
            log.warning("could not undo %s %s: %s", kind, value, first_line(err))


def _register(
    params: RegisterParams,
    evaluation: Evaluation,
    attachments: list[Attachment],
    client: Any,
    undo: list[tuple[str, Any]],
) -> Registration:
    import mlflow

    name = params.name or f"danet-{evaluation.dataset}"
    check_name(name, "register.name")
    model_uri, run_id = mlflow_model_uri(evaluation.model_uri, evaluation, attachments)
    tags = version_tags(evaluation, run_id, served_onnx(model_uri))
    champion = alias_version(client, name, CHAMPION)
    champion_tags = dict(champion.tags) if champion else None
    version = find_version(client, name, tags)
    if version is not None:  # the same model, evaluated the same way: no second version
        log.info("already registered as %s version %s", name, version.version)
    else:
        version = mlflow.register_model(model_uri, name, tags=tags)
        undo.append(("version", str(version.version)))
    if champion is not None and str(champion.version) == str(version.version):
        alias, reason = CHAMPION, "already the champion"
    else:
        alias, reason = decide(champion_tags, tags)
        previous = alias_version(client, name, alias)
        now = alias_version(client, name, CHAMPION)  # compare-and-set, for a tracking server
        if (now and now.version) != (champion and champion.version):
            raise ServiceError(
                f"register: the champion of {name} moved while this registered (another danet "
                "register): nothing kept, run it again"
            )
        client.set_registered_model_alias(name, alias, version.version)
        undo.append(("alias", (alias, str(previous.version) if previous else None)))
        client.set_model_version_tag(name, version.version, "reason", reason)
    describe(client, name, str(version.version), alias, evaluation, tags, model_uri, params)
    if alias == CHAMPION:
        champion_version, champion_miou = str(version.version), evaluation.miou
    else:
        assert champion is not None and champion_tags is not None
        champion_version = str(champion.version)
        champion_miou = _score(protocol_score(champion_tags))
    return Registration(
        name=name,
        version=str(version.version),
        alias=alias,
        reason=reason,
        eval_miou=evaluation.miou,
        eval_protocol=evaluation.protocol,
        champion_version=champion_version,
        champion_eval_miou=champion_miou,
        champion_uri=registry_uri(name, CHAMPION),
        runtimes=tags["runtimes"],
    )


def describe(
    client: Any,
    name: str,
    version: str,
    alias: str,
    evaluation: Evaluation,
    tags: dict[str, str],
    model_uri: str,
    params: RegisterParams,
) -> None:
    """What a person sees first: the evaluation's pictures on the logged model, the version's
    description, and the run's description with where it is registered and how to use it."""
    attach_evaluation(model_uri, Path(params.eval_metrics).parent, evaluation)
    text = describe_version(name, version, alias, evaluation, tags)
    client.update_model_version(name, version, description=text)
    run_id = tags["source_run_id"]
    note = client.get_run(run_id).data.tags.get(NOTE_TAG, "").split(REGISTERED)[0].rstrip()
    uri = registry_uri(name, alias)
    added = (
        f"{REGISTERED} as [{name} version {version}](#/models/{name}/versions/{version}) "
        f"@{alias}: eval mIoU {evaluation.miou:.4f} ({evaluation.protocol}). Use it as `{uri}`:"
        f"\n\n```bash\nmlflow models serve -m {uri} --env-manager local --port 5001\n"
        f"danet predict --model {uri} --out predictions IMAGES...\n```"
    )
    client.set_tag(run_id, NOTE_TAG, f"{note}\n\n{added}" if note else added)


def read_registration(path: Path) -> Registration:
    if not path.is_file():
        raise ConfigError(f"{path}: nothing registered yet (run dvc repro)")
    try:
        values = json.loads(path.read_text())
        for old, new in (("val_miou", "eval_miou"), ("champion_val_miou", "champion_eval_miou")):
            if isinstance(values, dict) and old in values:  # written before the rename
                values[new] = values.pop(old)
        return Registration(**values)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:
        raise DataError(path, f"not written by danet register ({err})") from None
