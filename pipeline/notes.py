"""What a person reads first in the MLflow UI: the Markdown descriptions of a training run, a
search and a registered version (the run's tag ``mlflow.note.content``, the version's
description). Plain text from plain values; the stages that log them pass what they know.

Each says the score with its protocol (pipeline/scores.py: ``best_val_miou`` is the run's own
validation, ``eval_miou`` the evaluate stage's), the data it was measured on (the shards'
digests, as the run's datasets name them), where the model came from (the search and trial) and
how to use it (the model URI, ``mlflow models serve``, ``danet predict``, the ONNX files).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.modelrefs import registry_uri, registry_version_uri, run_artifact_uri

NOTE_TAG = "mlflow.note.content"  # the run description the UI renders as Markdown
SERVE_PORT = 5001


def run_link(experiment_id: str, run_id: str, text: str) -> str:
    """A Markdown link to a run's page in the UI (relative: it works on any host)."""
    return f"[{text}](#/experiments/{experiment_id}/runs/{run_id})"


# MLflow's runs table opens on three columns (Source, Models, Dataset: its
# getDefaultSelectedColumns) whatever a run logs. A view saved as this experiment tag (the UI's
# own "Share" format, mlflow/server/js: the search facets and UI state as JSON) opens with a
# link (``?viewStateShareKey=<key>``) on the search's trials, their searched values and scores
# as columns, best first: the search's description links it.
SHARED_VIEW = "mlflow.sharedViewState."


def trials_view(search_run_id: str, keys: list[str]) -> dict[str, Any]:
    """The runs table's state showing a search's trials side by side: ``keys`` searched."""
    metrics = ("best_val_miou", "epochs_trained", "stopped_early")
    return {
        "searchFilter": f"tags.mlflow.parentRunId = '{search_run_id}'",
        "orderByKey": "metrics.`best_val_miou`",
        "orderByAsc": False,
        "selectedColumns": [
            *(f"params.`{k}`" for k in keys),
            *(f"metrics.`{m}`" for m in metrics),
        ],
    }


def trials_view_link(experiment: str, search_name: str) -> str:
    """The link (relative, as ``run_link``) that opens ``trials_view``."""
    return f"#/experiments/{experiment}/runs?viewStateShareKey={search_name}"


def code_block(lines: Sequence[str]) -> str:
    """A bash block whose lines fit the description's column (about 60 characters): a wider
    line does not wrap, it widens the column, which the run page then scrolls sideways."""
    return "```bash\n" + "\n".join(lines) + "\n```"


@dataclass(frozen=True)
class TrainingNote:
    """A training run (a refit, a plain run or a search's trial) as its description says it."""

    run_id: str
    experiment_id: str
    dataset: str
    backbone: str
    best_val_miou: float
    best_iteration: int
    iterations: int
    val_protocol: str
    data: Sequence[tuple[str, str]]  # (split, sha256) of the shards trained and validated on
    device: str
    tags: Mapping[str, str]  # the run's tags: the search and trial it refits, if any
    files: Sequence[str]  # the pictures and tables among its artifacts

    def origin(self) -> str:
        search, trial = (
            self.tags.get("danet.refit_of_search"),
            self.tags.get("danet.refit_of_trial"),
        )
        if not search:
            return "trained from params.yaml (no search)"
        exp, search_id = self.experiment_id, self.tags.get("danet.search_run_id", "")
        trial_id = self.tags.get("danet.refit_of_trial_run_id", "")
        found = run_link(exp, search_id, search) if search_id else f"`{search}`"
        best = run_link(exp, trial_id, str(trial)) if trial_id else f"`{trial}`"
        return f"the refit of search {found}: the best values of its trial {best}, trained in full"

    def markdown(self) -> str:
        weights = run_artifact_uri(self.run_id)
        data = ", ".join(f"{self.dataset}-{split} `{digest[:16]}`" for split, digest in self.data)
        files = ", ".join(f"`{name}`" for name in self.files)
        return "\n".join(
            [
                f"### DANet-{self.backbone} on {self.dataset}: best val mIoU "
                f"**{self.best_val_miou:.4f}**",
                "",
                f"- **Score**: `best_val_miou` {self.best_val_miou:.4f}, this run's own "
                f"validation ({self.val_protocol}) at iteration {self.best_iteration} of "
                f"{self.iterations}; `danet evaluate` scores it under its own protocol "
                "(`eval_miou`, on the registered version)",
                f"- **Data**: {data} (the shards' sha256, as under *Datasets*)",
                f"- **From**: {self.origin()}",
                f"- **Ran on**: {self.device}",
                f"- **Pictures** (*Artifacts*, one click each): {files}; `evaluations/`: the "
                "predictions and per-class IoU of every evaluation",
                "",
                "**Use the weights**",
                "",
                code_block(
                    [
                        f"MODEL={weights}",
                        "danet evaluate --model $MODEL",
                        "danet predict --model $MODEL --out predictions IMAGES...",
                        "danet export --model $MODEL --out model.onnx",
                    ]
                ),
            ]
        )


def version_note(
    name: str,
    version: str,
    alias: str,
    scores: Mapping[str, str],
    source: str,
    onnx: Mapping[str, str],
    request: str,
) -> str:
    """A registered version's description. ``scores``: ``eval_miou``, ``eval_protocol``, the
    evaluated ``data`` (name and digest), ``images`` and the run's ``best_val_miou``; ``source``:
    the run (a Markdown link) and its search; ``onnx``: runtime -> file sha256; ``request``:
    what a request holds and its params."""
    uri = registry_uri(name, alias) if alias else registry_version_uri(name, version)
    fixed = registry_version_uri(name, version)
    onnx_lines = [f"- `{runtime}`: sha256 `{digest[:16]}`" for runtime, digest in onnx.items()]
    return "\n".join(
        [
            f"### {name} version {version}: eval mIoU **{scores['eval_miou']}**",
            "",
            f"- **Score**: `eval_miou` {scores['eval_miou']} under `{scores['eval_protocol']}` "
            f"(`danet evaluate`) on {scores['images']} images of {scores['data']}; its run's "
            f"own validation (`best_val_miou`, whole image) {scores['best_val_miou']}",
            f"- **From**: {source}",
            "- **Pictures**: the logged model's *Artifacts*, `evaluation/`: predictions, "
            "confusion matrix, per-class IoU of this evaluation",
            "",
            f"**Use it**: `{uri}` (this version always: `{fixed}`)",
            "",
            code_block(
                [
                    f"MODEL={uri}",
                    "mlflow models serve -m $MODEL --env-manager local \\",
                    f"    --host 127.0.0.1 --port {SERVE_PORT}",
                    "danet predict --model $MODEL --out predictions IMAGES...",
                    "danet export --model $MODEL --quantize int8 --out model.onnx",
                ]
            ),
            "",
            "**ONNX files** (request `params.runtime`):"
            if onnx_lines
            else "**ONNX files**: none attached (`danet export`, then `register.onnx`)",
            *onnx_lines,
            "",
            request,
        ]
    )
