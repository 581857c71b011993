"""The MLflow descriptions a person reads first (pipeline/notes.py): scores with their protocol,
data, origin and how to use the model, in Markdown."""

from __future__ import annotations

from pipeline.modelrefs import registry_uri, run_artifact_uri
from pipeline.notes import TrainingNote, version_note


def code_lines(markdown: str) -> list[str]:
    """The lines of a description's code blocks."""
    blocks = markdown.split("```")[1::2]
    return [line for block in blocks for line in block.splitlines()[1:]]


def test_a_refits_description_names_its_score_data_search_and_use() -> None:
    tags = {
        "danet.refit_of_search": "tune-abc",
        "danet.search_run_id": "s" * 32,
        "danet.refit_of_trial": "tune-abc-t_00001",
        "danet.refit_of_trial_run_id": "t" * 32,
    }
    note = TrainingNote(
        run_id="r" * 32,
        experiment_id="1",
        dataset="synthetic",
        backbone="resnet18d",
        best_val_miou=0.61234,
        best_iteration=300,
        iterations=375,
        val_protocol="whole",
        data=[("train", "a" * 64), ("val", "b" * 64)],
        device="cpu x 1",
        tags=tags,
        files=["val_predictions.png", "per_class_iou.png"],
    ).markdown()
    assert "best val mIoU **0.6123**" in note and "(whole) at iteration 300 of 375" in note
    assert f"synthetic-val `{'b' * 16}`" in note
    assert f"[tune-abc](#/experiments/1/runs/{'s' * 32})" in note
    assert f"#/experiments/1/runs/{'t' * 32}" in note
    assert f"MODEL={run_artifact_uri('r' * 32)}" in note
    assert "danet predict --model $MODEL" in note
    assert max(map(len, code_lines(note))) <= 64  # a wider line widens the page's column
    assert "cpu x 1" in note and "`per_class_iou.png`" in note


def test_a_versions_description_says_how_to_serve_it_and_its_onnx_files() -> None:
    scores = {
        "eval_miou": "0.6168",
        "eval_protocol": "official-whole-flip",
        "data": "synthetic-val `0123456789abcdef`",
        "images": "8",
        "best_val_miou": "0.6077",
    }
    uri = registry_uri("danet-synthetic", "champion")
    text = version_note("danet-synthetic", "3", "champion", scores, "run x", {}, "Request: ...")
    assert f"`{uri}`" in text and f"MODEL={uri}" in text
    assert "mlflow models serve -m $MODEL" in text and "danet predict --model $MODEL" in text
    assert "none attached" in text and max(map(len, code_lines(text))) <= 64
    assert "`eval_miou` 0.6168 under `official-whole-flip`" in text and "0.6077" in text
    with_onnx = version_note(
        "danet-synthetic", "3", "", scores, "run x", {"onnx-int8": "f" * 64}, ""
    )
    assert "`onnx-int8`: sha256 `ffffffffffffffff`" in with_onnx
    assert "danet-synthetic/3" in with_onnx  # no alias: the fixed version's URI


def test_a_searchs_trials_view_shows_its_trials_with_their_values_and_scores() -> None:
    """MLflow's runs table opens on fixed columns: the view the search's description links
    (an experiment tag in the UI's own "Share" format) filters to the search's trials and shows
    the searched params and the scores as columns, best first."""
    from pipeline.notes import SHARED_VIEW, trials_view, trials_view_link

    view = trials_view("s" * 32, ["train.lr", "data.crop_size"])
    assert view["searchFilter"] == f"tags.mlflow.parentRunId = '{'s' * 32}'"
    assert view["orderByKey"] == "metrics.`best_val_miou`" and view["orderByAsc"] is False
    columns = view["selectedColumns"]
    assert columns[:2] == ["params.`train.lr`", "params.`data.crop_size`"]
    assert {"metrics.`best_val_miou`", "metrics.`epochs_trained`"} <= set(columns)
    assert trials_view_link("3", "tune-abc") == "#/experiments/3/runs?viewStateShareKey=tune-abc"
    assert SHARED_VIEW == "mlflow.sharedViewState."  # the UI reads exactly this tag prefix
