"""MLflow as users meet it: a tracking server on 127.0.0.1; train -> evaluate -> register against
it; lineage, the dataset input, system metrics, overlays per evaluation, scores on the model."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.sections import EvaluateParams, RegisterParams
from tests.conftest import synthetic_shards, tiny_params


@pytest.mark.slow
def test_train_evaluate_register_against_a_tracking_server(
    mlflow_server: str, tmp_path: Path, ray_cluster: None
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.artifacts.refs import load_model
    from pipeline.evaluation.evaluate import run_evaluation
    from pipeline.registry.register import register
    from pipeline.training.driver import run_training

    shards = synthetic_shards(tmp_path / "shards", 6, 2, max_count=3)
    tracking = {
        "tracking_uri": mlflow_server,
        "experiment": "server-test",
        "num_prediction_images": 2,
        "system_metrics_every": 1,
    }
    model, data, train, mlflow_params = tiny_params(
        tmp_path,
        shards,
        train={"iters_per_epoch": 3, "log_every": 3},
        data={"shuffle_buffer": 64},
        mlflow=tracking,
    )
    summary = run_training(model, data, train, mlflow_params)

    client = MlflowClient(mlflow_server)
    run = client.get_run(summary.mlflow_run_id)
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert len(tags["mlflow.source.git.commit"]) in (40, 7) and tags["danet.git_dirty"] in (
        "true",
        "false",
    )
    assert len(tags["danet.code_sha256"]) == 64
    # one dataset per split, named and digested as the evaluation and the registry name them
    datasets = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(datasets) == {"synthetic-train", "synthetic-val"}
    contexts = {n: d.tags[0].value for n, d in datasets.items()}
    assert contexts == {"synthetic-train": "training", "synthetic-val": "validation"}
    assert run.data.params["train.lr"] == "0.01"
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)
    # the val overlays before the first step and at each of the two evaluations, through the server
    pictures = [a.path for a in client.list_artifacts(run.info.run_id, "evaluations")]
    assert len([p for p in pictures if "val_predictions_" in p]) == 3, pictures

    uri_model = str(tmp_path / "out" / "model.pt")
    evaluation = run_evaluation(
        EvaluateParams(model=uri_model, shards=str(shards), out=str(tmp_path / "eval")),
        mlflow_server,
    )
    scored = client.get_run(summary.mlflow_run_id).data.metrics
    assert scored["val/official-whole-flip/miou"] == pytest.approx(evaluation.miou)
    assert "val/official-whole-flip/mean_acc" in scored  # per-class IoU: a picture, not 11 charts
    assert datasets["synthetic-val"].dataset.digest == evaluation.split_sha256[:16]
    mlflow.set_tracking_uri(mlflow_server)
    experiments = [run.info.experiment_id]
    assert not mlflow.search_logged_models(experiment_ids=experiments, output_format="list")

    (tmp_path / "eval.json").write_text(evaluation.to_json())
    result = register(
        RegisterParams(eval_metrics=str(tmp_path / "eval.json"), out=str(tmp_path / "reg.json")),
        mlflow_server,
    )
    version = client.get_model_version(result.name, result.version)
    assert (
        result.alias == "champion" and version.run_id == summary.mlflow_run_id
    )  # linked to its run
    assert version.tags["data_sha256"] == evaluation.split_sha256
    # register logged the served model into the run, the evaluation's scores (each once, on the
    # evaluated dataset) and nothing else on the model's page: no system metrics, no curves
    (logged,) = mlflow.search_logged_models(experiment_ids=experiments, output_format="list")
    keys = [m.key for m in logged.metrics or []]
    assert sorted(keys) == sorted(evaluation.mlflow_metrics()), keys
    assert {(m.dataset_name, m.dataset_digest) for m in logged.metrics or []} == {
        ("synthetic-val", evaluation.split_sha256[:16])
    }
    assert logged.name == summary.run_name
    assert client.get_run(summary.mlflow_run_id).info.status == "FINISHED"
    # the run's model.pt moved into the served model through the server: stored once, and the
    # run's weights URI still loads them
    assert "model.pt" not in {a.path for a in client.list_artifacts(summary.mlflow_run_id)}
    weights = load_model(f"runs:/{summary.mlflow_run_id}/model.pt", mlflow_server).weights
    assert weights is not None and weights.read_bytes() == Path(uri_model).read_bytes()


def test_an_active_experiment_left_by_the_caller_does_not_block_resuming_a_run(
    tmp_path: Path,
) -> None:
    """mlflow.set_experiment in the caller's process (a notebook, another test) must not make
    the pipeline's start_run(run_id=...) refuse its own run of another experiment."""
    import mlflow

    from pipeline.mlflowstore import tracking_uri

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracking_uri(uri):
        ours = mlflow.MlflowClient(uri).create_experiment("ours")
        run_id = mlflow.MlflowClient(uri).create_run(ours).info.run_id
        mlflow.set_experiment("someone-elses")  # left active by the caller
    with tracking_uri(uri), mlflow.start_run(run_id=run_id):
        mlflow.log_metric("x", 1.0)
    assert mlflow.MlflowClient(uri).get_run(run_id).data.metrics == {"x": 1.0}
