"""The MLflow model registry: the champion moves only on a strict win on a comparable evaluation
(same dataset, split, data digest and protocol); repeat = same version; all or nothing."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.registry.register import CHALLENGER, CHAMPION, decide, register
from pipeline.sections import RegisterParams
from tests.conftest import evaluation, evaluation_record, use_experiment

BASE = {
    "dataset": "synthetic",
    "split": "val",
    "data_sha256": "abc",
    "eval_protocol": "official-whole-flip",
}


def tags(miou: float, **changes: str) -> dict[str, str]:
    return {**BASE, "eval_miou": f"{miou:.6f}", **changes}


@pytest.mark.parametrize(
    ("new", "alias", "reason"),
    [
        (tags(0.6), CHAMPION, "eval mIoU 0.6000 beats the champion's 0.5000"),
        (tags(0.5), CHALLENGER, "does not beat"),  # a tie does not move it
        (tags(0.4), CHALLENGER, "does not beat"),
        (tags(0.9, dataset="cityscapes"), CHALLENGER, "not comparable: the champion has dataset"),
        (
            tags(0.9, split="train"),
            CHALLENGER,
            "not comparable: the champion has split 'val', this 'train'",
        ),
        (tags(0.9, data_sha256="def"), CHALLENGER, "not comparable: the champion has data_sha256"),
        (
            tags(0.9, eval_protocol="official-whole-ms6-flip"),
            CHALLENGER,
            "not comparable: the champion has eval_protocol",
        ),
    ],
)
def test_decide_each_case(new: dict[str, str], alias: str, reason: str) -> None:
    got_alias, got_reason = decide(tags(0.5), new)
    assert got_alias == alias and reason in got_reason
    assert decide(None, new) == (CHAMPION, "no champion yet")


def test_the_champions_model_registered_again_with_onnx_files_takes_over() -> None:
    """The same run and evaluation serving more runtimes replaces the champion's version; with
    fewer it does not (a later register without register.onnx keeps the ONNX champion)."""
    torch_only = tags(0.5, source_run_id="r1", runtimes="torch")
    with_onnx = tags(0.5, source_run_id="r1", runtimes="torch,onnx,onnx-int8")
    assert decide(torch_only, with_onnx)[0] == CHAMPION
    assert "served by torch,onnx,onnx-int8" in decide(torch_only, with_onnx)[1]
    assert decide(with_onnx, torch_only)[0] == CHALLENGER
    assert decide(torch_only, {**with_onnx, "source_run_id": "r2"})[0] == CHALLENGER  # a tie


def test_a_champion_registered_before_the_rename_defends_its_val_miou_tag() -> None:
    """Versions registered before ``eval_miou`` carry the same score as ``val_miou``: it still
    defends the champion (pipeline/scores.py), and NaN never wins."""
    old = {**BASE, "val_miou": "0.500000"}
    assert decide(old, tags(0.5))[0] == CHALLENGER
    assert decide(old, tags(0.6)) == (CHAMPION, "eval mIoU 0.6000 beats the champion's 0.5000")
    assert decide(tags(0.5), tags(float("nan")))[0] == CHALLENGER


def test_one_rule_for_best() -> None:
    from pipeline.scores import beats, best

    assert beats(0.6, 0.5) and not beats(0.5, 0.5) and not beats(float("nan"), None)
    assert beats(0.1, None) and beats(0.1, float("nan"))
    rows = [("a", 0.5), ("b", float("nan")), ("c", 0.7), ("d", 0.7)]
    assert best(rows, lambda r: r[1]) == ("c", 0.7)  # the first on ties
    assert best([("x", float("nan"))], lambda r: r[1]) is None


def champion_version(uri: str) -> str:
    from mlflow.tracking import MlflowClient

    return str(MlflowClient(uri).get_model_version_by_alias("danet-synthetic", CHAMPION).version)


def test_register_moves_champion_only_on_a_win(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)

    first = register(evaluation(tmp_path, uri, 0.50), uri)
    assert (first.version, first.alias) == ("1", CHAMPION)
    worse = register(evaluation(tmp_path, uri, 0.40), uri)
    assert (worse.version, worse.alias) == ("2", CHALLENGER)
    for change in (
        {"protocol": "official-whole-ms6-flip"},
        {"split": "train"},
        {"split_sha256": "other"},
    ):
        other = register(evaluation(tmp_path, uri, 0.90, **change), uri)
        assert other.alias == CHALLENGER and "not comparable" in other.reason
        assert (
            client.get_model_version("danet-synthetic", other.version).tags["reason"]
            == other.reason
        )
    assert champion_version(uri) == "1"

    better = evaluation(tmp_path, uri, 0.55)
    won = register(better, uri)
    assert (won.version, won.alias, won.champion_version) == ("6", CHAMPION, "6")
    champion = client.get_model_version_by_alias("danet-synthetic", CHAMPION)
    assert (
        champion.tags["eval_miou"] == "0.550000"
        and champion.tags["eval_protocol"] == "official-whole-flip"
    )
    assert {"dataset", "split", "data_sha256", "git_commit", "source_run_id"} <= set(champion.tags)

    again = register(better, uri)  # the same evaluation again: no new version, champion kept
    assert (again.version, again.alias) == ("6", CHAMPION)
    assert len(client.search_model_versions("name = 'danet-synthetic'")) == 6
    assert json.loads(Path(better.out).read_text())["champion_version"] == "6"

    from pipeline.artifacts.refs import load_model
    from pipeline.errors import ModelError

    # a pickled torch module (MLflow's pytorch flavour) is never unpickled to be used
    with pytest.raises(ModelError, match="not a model logged by danet train: refused"):
        load_model("models:/danet-synthetic@champion", uri)


def test_register_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after the version and the alias changed puts both back."""
    from mlflow.tracking import MlflowClient

    import pipeline.registry.register as module

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register(evaluation(tmp_path, uri, 0.50), uri)
    params = evaluation(tmp_path, uri, 0.70)
    before = Path(params.out).read_text()

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the output could not be written")

    monkeypatch.setattr(module.Registration, "__init__", broken)
    with pytest.raises(RuntimeError, match="could not be written"):
        register(params, uri)
    client = MlflowClient(uri)
    assert [str(v.version) for v in client.search_model_versions("name = 'danet-synthetic'")] == [
        "1"
    ]
    assert champion_version(uri) == "1"
    assert Path(params.out).read_text() == before


def test_register_refuses_before_touching_mlflow(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ConfigError, match=r"missing\.json: evaluation metrics do not exist"):
        register(RegisterParams(eval_metrics=str(tmp_path / "missing.json")), uri)
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    params = dataclasses.replace(
        evaluation(tmp_path, uri, 0.5), out=str(blocker / "registered.json")
    )
    from pipeline.errors import ServiceError

    with pytest.raises(ServiceError, match=r"file/registered\.json: cannot write here"):
        register(params, uri)
    from mlflow.tracking import MlflowClient

    assert MlflowClient(uri).search_registered_models() == []


def test_register_logs_the_served_model_from_a_training_runs_weights(
    tiny_shards: Path, tmp_path: Path
) -> None:
    """A training run holds model.pt only; registering its evaluation logs the served pyfunc into
    that run once (the run keeps its status), with the scores on the logged model; the run id
    loads the served model from then on, the weights before."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.artifacts.refs import load_model
    from pipeline.mlflowstore import tracking_uri
    from tests.conftest import write_model_file

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracking_uri(uri):
        use_experiment(uri, "synthetic")
        with mlflow.start_run() as run:
            run_id = run.info.run_id
            model = write_model_file(tmp_path / "model.pt", tiny_shards, mlflow_run_id=run_id)
            mlflow.log_artifact(str(model))  # as training logs it
    client = MlflowClient(uri)
    client.set_terminated(run_id, "KILLED")  # e.g. a search trial: register must not change it
    before = load_model(run_id, uri)
    assert before.uri == f"runs:/{run_id}/model.pt" and before.classes[3] == "Road"

    per_class = dict.fromkeys(before.classes, 0.42)
    record = evaluation_record(str(model), 0.42, iou_per_class=per_class)
    (tmp_path / "metrics.json").write_text(record.to_json())
    params = RegisterParams(
        eval_metrics=str(tmp_path / "metrics.json"), out=str(tmp_path / "r.json")
    )
    first = register(params, uri)
    again = register(params, uri)
    assert (first.version, again.version) == ("1", "1")
    with tracking_uri(uri):
        logged = mlflow.search_logged_models(
            filter_string=f"source_run_id = '{run_id}'", output_format="list"
        )
        meta = mlflow.models.get_model_info(logged[0].model_uri).metadata
    # the metadata keeps the weights' own score; the evaluation's are the model's metrics
    assert len(logged) == 1 and not [k for k in meta if k.startswith("eval")]
    assert any(m.key == "val/official-whole-flip/miou" for m in logged[0].metrics or [])
    assert client.get_run(run_id).info.status == "KILLED"
    version = client.get_model_version("danet-synthetic", "1")
    assert version.run_id == run_id
    # the registry page says how to call it: the request, the signature's params, the runtimes
    for words in ("`image`", "`mode` (auto)", "`runtime` (torch)", "eval mIoU **0.4200**"):
        assert words in version.description, version.description
    served = load_model("models:/danet-synthetic@champion", uri)
    assert served.uri.startswith("models:/") and served.classes == before.classes
    assert load_model(run_id, uri).uri == logged[0].model_uri
    # the weights moved into the served model: stored once, and the run's URI still finds them
    assert "model.pt" not in {a.path for a in client.list_artifacts(run_id)}
    stored = [p for p in tmp_path.rglob("model.pt") if "mlruns" in p.parts]
    assert len(stored) == 1 and stored[0].read_bytes() == model.read_bytes()
    weights = load_model(f"runs:/{run_id}/model.pt", uri).weights
    assert weights is not None and weights.read_bytes() == model.read_bytes()


def test_a_killed_registers_pending_model_is_cleaned_by_the_next(tmp_path: Path) -> None:
    """A SIGKILLed ``danet register --onnx`` leaves its logged model PENDING; the next register
    of the run deletes it (its writer, of this host, no longer runs), keeps a live writer's, and
    the run's model is the READY one only."""
    import subprocess

    import mlflow

    from pipeline.mlflowstore import WRITER_TAG, drop_dead_pending, logged_model_uri, tracking_uri
    from pipeline.outputs import writer_id

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = writer_id().split("-")[0]
    with tracking_uri(uri):
        use_experiment(uri, "synthetic")
        with mlflow.start_run() as run:
            run_id = run.info.run_id
        killed = mlflow.initialize_logged_model("model", run_id, {WRITER_TAG: f"{host}-{dead.pid}"})
        live = mlflow.initialize_logged_model(
            "model", run_id, {WRITER_TAG: f"{host}-{os.getppid()}"}
        )
        assert logged_model_uri(run_id) is None  # PENDING models are no model of the run
        assert drop_dead_pending(run_id) == [killed.model_id]
        left = mlflow.search_logged_models(
            filter_string=f"source_run_id = '{run_id}'", output_format="list"
        )
    assert [m.model_id for m in left] == [live.model_id]
