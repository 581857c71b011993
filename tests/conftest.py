"""Shared fixtures: no test sees the user's MLflow or Ray settings, or leaks its own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from danet import DANetConfig, build_danet
from pipeline.datasets.synthetic import SyntheticReader
from pipeline.shard import shard_dataset


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    yield
    import mlflow

    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # a test that set it leaves no trace


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic shards, 64x48: 6 train and 4 val images."""
    out = tmp_path_factory.mktemp("tiny") / "shards"
    reader = SyntheticReader(num_samples={"train": 6, "val": 4}, width=64, height=48)
    shard_dataset(reader, ("train", "val"), out, max_count=3)
    return out


def write_model_file(path: Path, shards: Path, seed: int = 0, **meta: object) -> Path:
    """A randomly initialised DANet-R18d for the shards' classes, saved as training saves it."""
    from pipeline.shard import load_manifest
    from pipeline.train import save_model_file

    manifest = load_manifest(shards)
    torch.manual_seed(seed)
    config = DANetConfig(num_classes=len(manifest["classes"]), backbone="resnet18d")
    model = build_danet(config)
    save_model_file(
        path, model.state_dict(), config, manifest["classes"], manifest["palette"],
        manifest["mean"], manifest["std"], manifest["dataset"], **meta,
    )  # fmt: skip
    return path
