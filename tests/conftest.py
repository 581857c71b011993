"""Shared fixtures: no test sees the user's MLflow or Ray settings, or leaks its own; one local Ray
for the whole session; tiny synthetic shards; model files as training writes them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from danet import DANetConfig, build_danet
from pipeline.artifacts.modelfile import ModelInfo, save_model_file
from pipeline.data.manifest import load_manifest
from pipeline.data.readers.synthetic import SyntheticReader
from pipeline.data.shard import shard_dataset

ROOT = Path(__file__).resolve().parents[1]
CAMVID = ROOT.parent / "shared" / "data" / "camvid"


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    yield
    import mlflow

    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # a test that set it leaves no trace


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray for every test that needs it (2 CPUs, dashboard on 127.0.0.1)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


def synthetic_shards(out: Path, train: int, val: int, max_count: int, **reader: int) -> Path:
    """Synthetic scenes (64x48 unless told) sharded into ``out``."""
    width, height = reader.get("width", 64), reader.get("height", 48)
    shard_dataset(
        SyntheticReader(num_samples={"train": train, "val": val}, width=width, height=height),
        ("train", "val"),
        out,
        max_count=max_count,
    )
    return out


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic shards, 64x48: 6 train and 4 val images."""
    return synthetic_shards(tmp_path_factory.mktemp("tiny") / "shards", 6, 4, max_count=3)


def write_model_file(path: Path, shards: Path, seed: int = 0, **meta: object) -> Path:
    """A randomly initialised DANet-R18d for the shards' classes, saved as training saves it."""
    manifest = load_manifest(shards)
    torch.manual_seed(seed)
    config = DANetConfig(num_classes=manifest.num_classes, backbone="resnet18d")
    model = build_danet(config)
    info = ModelInfo(
        config=config,
        classes=manifest.classes,
        palette=manifest.palette,
        mean=manifest.mean,
        std=manifest.std,
        dataset=manifest.dataset,
        meta=dict(meta),
    )
    save_model_file(path, model.state_dict(), info)
    return path
