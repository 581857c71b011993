"""The MLflow model registry: champion moves only on a win, never demoted; repeat = same version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import ConfigError, RegisterParams
from pipeline.registry.register import CHALLENGER, CHAMPION, decide, register


def tags(miou: float, protocol: str = "whole-flip", dataset: str = "synthetic") -> dict[str, str]:
    return {"dataset": dataset, "eval_protocol": protocol, "val_miou": f"{miou:.6f}"}


def test_decide_never_demotes() -> None:
    assert decide(None, tags(0.1))[0] == CHAMPION
    assert decide(tags(0.5), tags(0.6))[0] == CHAMPION
    assert decide(tags(0.5), tags(0.5))[0] == CHALLENGER  # a tie does not move it
    assert decide(tags(0.5), tags(0.4))[0] == CHALLENGER
    alias, reason = decide(tags(0.5), tags(0.9, protocol="whole-ms6-flip"))
    assert alias == CHALLENGER and "not comparable" in reason
    assert decide(tags(0.5), tags(0.9, dataset="cityscapes"))[0] == CHALLENGER


def log_model(uri: str, dataset: str = "synthetic") -> str:
    """A tiny logged model (with a run) as training logs it; returns its run id."""
    import mlflow
    import torch

    from pipeline.artifacts.tracking import tracking_uri

    with tracking_uri(uri):
        mlflow.set_experiment(dataset)
        with mlflow.start_run() as run:
            mlflow.pytorch.log_model(
                torch.nn.Conv2d(3, 2, 1), name="model", serialization_format="pickle",
                metadata={"classes": ["a", "b"], "palette": [[0, 0, 0], [255, 255, 255]],
                          "dataset": dataset},
            )  # fmt: skip
    return run.info.run_id


def evaluation(tmp: Path, uri: str, miou: float, protocol: str = "whole-flip") -> RegisterParams:
    """An evaluation of a freshly logged model, as danet evaluate writes it."""
    import mlflow

    from pipeline.artifacts.tracking import tracking_uri

    run_id = log_model(uri)
    with tracking_uri(uri):
        model_uri = mlflow.search_logged_models(
            filter_string=f"source_run_id = '{run_id}'", output_format="list"
        )[0].model_uri
    path = tmp / f"eval-{run_id}.json"
    path.write_text(json.dumps(
        {"dataset": "synthetic", "miou": miou, "protocol": protocol, "model_uri": model_uri}
    ))  # fmt: skip
    return RegisterParams(eval_metrics=str(path), out=str(tmp / "registered.json"))


def test_register_moves_champion_only_on_a_win(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)

    first = register(evaluation(tmp_path, uri, 0.50), uri)
    assert (first["version"], first["alias"]) == ("1", CHAMPION)
    worse = register(evaluation(tmp_path, uri, 0.40), uri)
    assert (worse["version"], worse["alias"]) == ("2", CHALLENGER)
    other = register(evaluation(tmp_path, uri, 0.90, protocol="whole-ms6-flip"), uri)
    assert other["alias"] == CHALLENGER and "not comparable" in other["reason"]
    assert str(client.get_model_version_by_alias("danet-synthetic", CHAMPION).version) == "1"

    better = evaluation(tmp_path, uri, 0.55)
    won = register(better, uri)
    assert (won["version"], won["alias"]) == ("4", CHAMPION)
    champion = client.get_model_version_by_alias("danet-synthetic", CHAMPION)
    assert str(champion.version) == "4"
    assert (
        champion.tags["val_miou"] == "0.550000" and champion.tags["eval_protocol"] == "whole-flip"
    )
    assert {"dataset", "data_sha256", "git_commit", "source_run_id"} <= set(champion.tags)
    assert str(client.get_model_version_by_alias("danet-synthetic", CHALLENGER).version) == "3"

    again = register(better, uri)  # the same evaluation again: no new version, champion kept
    assert (again["version"], again["alias"]) == ("4", CHAMPION)
    assert len(client.search_model_versions("name = 'danet-synthetic'")) == 4
    assert json.loads(Path(better.out).read_text())["champion_version"] == "4"

    from pipeline.artifacts.refs import load_model

    loaded = load_model("models:/danet-synthetic@champion", uri)
    assert loaded.classes == ("a", "b") and loaded.dataset == "synthetic"


def test_register_without_evaluation_is_one_line(tmp_path: Path) -> None:
    params = RegisterParams(eval_metrics=str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match=r"missing\.json: evaluation metrics do not exist"):
        register(params, f"sqlite:///{tmp_path / 'mlflow.db'}")
