"""What a registered version serves: the pyfunc of a training run's weights, logged into that
run (pipeline/artifacts/pyfunc.py), with the ONNX files of ``register.onnx`` when asked; the
run's ``model.pt`` artifact then moves into it (stored once).

A run holds one served model per set of attached files, found again by their digests (the
model's ``sha256`` metadata), so registering the same run twice logs nothing twice. An ONNX file
is attached only when its ``source_sha256`` (``danet export`` writes it) is the digest of the
weights being registered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.artifacts.modelfile import file_sha256, read_model_info, recorded_run
from pipeline.config import ConfigError
from pipeline.errors import DataError, ModelError, first_line
from pipeline.evaluation.report import Evaluation
from pipeline.mlflowstore import (
    RUN_NAME_TAG,
    delete_run_artifact,
    drop_dead_pending,
    log_scores,
    model_run,
    run_weights,
    run_weights_uri,
)
from pipeline.modelrefs import WEIGHTS_FILE, parse_model_ref

WEIGHTS = WEIGHTS_FILE  # the weights' entry in a served model's sha256 metadata
TORCH = "torch"  # the runtime of the weights (pipeline/artifacts/pyfunc.py RUNTIMES)


@dataclass(frozen=True)
class Attachment:
    """An ONNX file of ``register.onnx``, read and checked before MLflow is touched."""

    runtime: str  # onnx | onnx-int8: the request's params.runtime that it serves
    path: Path
    sha256: str
    source_sha256: str  # the digest of the weights it was exported from


def read_attachments(files: Sequence[str]) -> list[Attachment]:
    """``register.onnx``: each a ``danet export`` file (missing, corrupt, foreign: one line
    naming it), at most one float (``onnx``) and one INT8 (``onnx-int8``)."""
    from pipeline.artifacts.onnxfile import load_onnx

    found: dict[str, Attachment] = {}
    for name in files:
        path = Path(name)
        if path.suffix != ".onnx":
            raise ConfigError(f"register.onnx {path}: not an .onnx file (danet export writes one)")
        _, info = load_onnx(path)
        runtime = "onnx-int8" if info.meta.get("quantize") == "int8" else "onnx"
        if runtime in found:
            raise ConfigError(
                f"register.onnx: {found[runtime].path} and {path} are both {runtime} exports: "
                "attach one float and one INT8 file at most"
            )
        found[runtime] = Attachment(runtime, path, file_sha256(path), info.meta["source_sha256"])
    return list(found.values())


def check_sources(attachments: Sequence[Attachment], weights: Path) -> str:
    """The weights' sha256, which every attachment must have been exported from (its metadata
    says so) and whose logits its graph must give on a probe image (metadata can be copied)."""
    from pipeline.artifacts.onnxfile import check_same_model
    from pipeline.artifacts.refs import load_model

    expected = file_sha256(weights)
    for item in attachments:
        if item.source_sha256 != expected:
            raise DataError(
                item.path,
                f"exported from another model (sha256 {item.source_sha256[:12]}), not the "
                f"registered one ({weights.name}, sha256 {expected[:12]}): export that model again",
            )
    if attachments:
        module = load_model(str(weights)).module
        for item in attachments:
            check_same_model(item.path, module, quantized=item.runtime == "onnx-int8")
    return expected


def mlflow_model_uri(
    model_uri: str, evaluation: Evaluation, attachments: Sequence[Attachment] = ()
) -> tuple[str, str]:
    """An MLflow model URI and its run id for an evaluated model. A training run's weights (a
    model.pt, which names its run, or ``runs:/<id>/model.pt``) become the served pyfunc here,
    logged into that run once for each set of ``attachments`` (ONNX files exported from these
    weights): the registry holds what is served. The run's own model.pt artifact is then
    deleted (``move_weights``)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    ref = parse_model_ref(model_uri)
    weights: Path | None = None
    if ref.in_mlflow and not ref.is_run_weights:
        try:
            info = mlflow.models.get_model_info(model_uri)
        except MlflowException as err:
            raise ModelError(model_uri, f"not an MLflow model ({first_line(err)})") from None
        if not attachments:
            return model_uri, info.run_id or ""
        if not info.run_id:
            raise ModelError(model_uri, "has no MLflow run to log it with its ONNX files into")
        from pipeline.artifacts.refs import load_model

        run_id, weights = info.run_id, load_model(model_uri).weights  # its model.pt, downloaded
    else:
        found = model_run(model_uri, recorded_run(model_uri))
        if found is None:
            raise ModelError(
                model_uri, "has no MLflow run to register it from (trained without one)"
            )
        run_id = found[0]
        weights = ref.path if ref.kind == "file" else None
    given = weights  # MLmodel names it as where the weights came from (else the run's, below)
    digests = {item.runtime: item.sha256 for item in attachments}
    weights_sha256 = ""  # hashed once: by the check, else by log_into_run
    if attachments:  # checked before a served model is looked for or logged
        weights = weights or run_weights(run_id)
        if weights is None or not weights.is_file():
            raise ModelError(model_uri, "its run holds no model.pt to check the ONNX files against")
        weights_sha256 = check_sources(attachments, weights)
    served = served_model(run_id, digests)
    if served is None:
        weights = weights or run_weights(run_id)
        if weights is None or not weights.is_file():
            raise ModelError(model_uri, "its run holds no model.pt (mlflow.log_model: false?)")
        # where the run's weights are (its artifact, or a served model they moved into), looked
        # up only when a served model is logged
        source = str(given.resolve()) if given is not None else run_weights_uri(run_id) or ""
        served = log_into_run(run_id, weights, evaluation, attachments, weights_sha256, source)
    move_weights(run_id, served)
    return served, run_id


def move_weights(run_id: str, served: str) -> bool:
    """The run's ``model.pt`` artifact deleted once the served model ``served`` holds the same
    file (its sha256; a user's file may name this run): the weights are stored once, in what the
    registry serves (``run_weights`` and every model reference find them there)."""
    import tempfile

    import mlflow
    from mlflow.tracking import MlflowClient

    meta = mlflow.models.get_model_info(served).metadata or {}
    digest = str((meta.get("sha256") or {}).get(WEIGHTS, ""))
    if not digest or WEIGHTS_FILE not in {a.path for a in MlflowClient().list_artifacts(run_id)}:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=WEIGHTS_FILE, dst_path=tmp
        )
        same = file_sha256(Path(local)) == digest
    return same and delete_run_artifact(run_id, WEIGHTS_FILE)


def onnx_digests(meta: dict[str, Any]) -> dict[str, str]:
    """A served model's attached ONNX files, runtime -> sha256, from its metadata."""
    return {k: str(v) for k, v in (meta.get("sha256") or {}).items() if k != WEIGHTS}


def served_onnx(model_uri: str) -> dict[str, str]:
    import mlflow

    return onnx_digests(mlflow.models.get_model_info(model_uri).metadata or {})


def served_model(run_id: str, onnx: dict[str, str]) -> str | None:
    """The URI of a served model logged into ``run_id`` with exactly the ONNX files of digests
    ``onnx`` (``{}``: none), newest first; None when there is none yet."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        experiment_id = mlflow.get_run(run_id).info.experiment_id
        models = mlflow.search_logged_models(
            experiment_ids=[experiment_id],
            filter_string=f"source_run_id = '{run_id}'",
            output_format="list",
        )  # newest first
        for model in models:
            meta = mlflow.models.get_model_info(model.model_uri).metadata or {}
            if "classes" in meta and onnx_digests(meta) == onnx:
                return str(model.model_uri)
    except MlflowException:
        return None
    return None


def log_into_run(
    run_id: str,
    weights: Path,
    evaluation: Evaluation,
    attachments: Sequence[Attachment] = (),
    weights_sha256: str = "",
    source: str = "",
) -> str:
    """The served pyfunc of ``weights`` (and the ``attachments``) logged into run ``run_id``
    (whose status it keeps), the evaluation's scores on the logged model's page.
    ``weights_sha256``: the weights' digest when the caller has it ("": hashed here)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.artifacts.pyfunc import log_served_model

    client = MlflowClient()
    run = client.get_run(run_id)
    status, name = run.info.status, run.data.tags.get(RUN_NAME_TAG) or "model"
    drop_dead_pending(run_id)  # a killed register's half-logged model (we hold the registry lock)
    onnx = {item.runtime: item.path for item in attachments}
    digests = {
        WEIGHTS: weights_sha256 or file_sha256(weights),
        **{a.runtime: a.sha256 for a in attachments},
    }
    with mlflow.start_run(run_id=run_id):
        info = log_served_model(weights, read_model_info(weights), onnx, digests, name, source)
    client.set_terminated(run_id, status)  # leaving start_run marked it FINISHED
    log_scores(
        mlflow.get_tracking_uri(),
        str(info.model_uri),
        evaluation.mlflow_metrics(),
        evaluation.mlflow_dataset(),
    )
    return str(info.model_uri)


def usage(evaluation: Evaluation, runtimes: str) -> str:
    """What a request holds and the params it takes (the signature's, with their defaults)."""
    from pipeline.artifacts.pyfunc import DEFAULT_PARAMS

    params = ", ".join(f"`{k}` ({v})" for k, v in DEFAULT_PARAMS.items())
    return (
        "**Request**: a dataframe with one column `image`, the bytes of a PNG or JPEG. "
        "**Response**: `labels` (a single-channel PNG of train ids, base64), `height`, `width`.\n\n"
        f"**Params** (defaults): {params}; `mode` auto | whole | slide; `runtime` one of "
        f"{runtimes.replace(',', ', ')}."
    )


def describe_version(
    name: str, version: str, alias: str, evaluation: Evaluation, tags: dict[str, str]
) -> str:
    """The version's description in the registry (pipeline/notes.py): its eval mIoU and
    protocol, the shards, the run and search it came from, how to use it, its ONNX files."""
    from mlflow.tracking import MlflowClient

    from pipeline.notes import run_link, version_note

    run = MlflowClient().get_run(tags["source_run_id"])
    run_tags = run.data.tags
    data, digest = evaluation.mlflow_dataset()
    source = run_link(run.info.experiment_id, run.info.run_id, run.info.run_name or "its run")
    if search := run_tags.get("danet.refit_of_search"):
        search_id = run_tags.get("danet.search_run_id", "")
        found = run_link(run.info.experiment_id, search_id, search) if search_id else search
        source += f", the refit of search {found} ({run_tags.get('danet.refit_of_trial', '')})"
    scores = {
        "eval_miou": f"{evaluation.miou:.4f}",
        "eval_protocol": evaluation.protocol,
        "data": f"{data} `{digest}`",
        "images": str(evaluation.images),
        "best_val_miou": run_tags.get("best_val_miou", "n/a"),
    }
    onnx = dict(part.split("=", 1) for part in tags.get("onnx_sha256", "").split(",") if part)
    return version_note(
        name, version, alias, scores, source, onnx, usage(evaluation, tags["runtimes"])
    )


def attach_evaluation(model_uri: str, report: Path, evaluation: Evaluation) -> str:
    """The evaluate stage's pictures (``report``: its folder) and a per-class IoU chart on the
    logged model, under ``evaluation/<split>-<protocol>/``; returns that folder."""
    import tempfile

    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.evaluation.report import REPORT
    from pipeline.pictures import plot_per_class_iou

    folder = f"evaluation/{evaluation.split}-{evaluation.protocol}"
    model_id = mlflow.models.get_model_info(model_uri).model_id
    if not model_id:
        return ""
    with tempfile.TemporaryDirectory() as tmp:
        title = f"{evaluation.dataset} {evaluation.split} ({evaluation.protocol}): per-class IoU"
        plot_per_class_iou(evaluation.iou_per_class.items(), Path(tmp) / "per_class_iou.png", title)
        for key in ("predictions", "confusion_matrix"):
            if (report / REPORT[key]).is_file():
                (Path(tmp) / REPORT[key]).write_bytes((report / REPORT[key]).read_bytes())
        MlflowClient().log_model_artifacts(model_id, tmp, artifact_path=folder)
    return folder
