"""params.yaml and every preset in configs/ load into the typed sections and agree with each other."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import (
    DataParams,
    MlflowParams,
    ModelParams,
    ShardParams,
    SyntheticParams,
    TrainParams,
    from_mapping,
    read_params,
)
from pipeline.datasets import READERS
from pipeline.evaluate import EvaluateParams
from pipeline.registry import RegisterParams
from pipeline.tune import TuneParams

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {
    "synthetic": SyntheticParams,
    "shard": ShardParams,
    "model": ModelParams,
    "data": DataParams,
    "train": TrainParams,
    "mlflow": MlflowParams,
    "tune": TuneParams,
    "evaluate": EvaluateParams,
    "register": RegisterParams,
}
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))
CLASSES = {"cityscapes": 19, "voc": 21, "pascal_context": 59, "cocostuff": 171, "ade20k": 150,
           "camvid": 11}  # fmt: skip


def load_all(path: Path) -> dict[str, object]:
    raw = read_params(path)
    assert set(raw) == set(SECTIONS), f"{path.name}: sections {sorted(raw)}"
    return {name: from_mapping(cls, raw[name], name) for name, cls in SECTIONS.items()}


def test_default_params_are_the_embedded_demo() -> None:
    s = load_all(ROOT / "params.yaml")
    assert s["shard"].dataset == "synthetic"  # type: ignore[attr-defined]
    assert s["model"].backbone == "resnet18d"  # type: ignore[attr-defined]
    assert not s["train"].use_gpu  # type: ignore[attr-defined]


def test_every_paper_dataset_has_a_preset() -> None:
    assert {p.stem for p in PRESETS} >= {
        "cityscapes", "voc_aug", "pascal_context", "cocostuff", "ade20k", "camvid",
    }  # fmt: skip


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_is_valid_and_complete(path: Path) -> None:
    s = load_all(path)
    default = read_params(ROOT / "params.yaml")
    for name, values in read_params(path).items():
        assert set(values) == set(default[name]), (
            f"{path.name}: {name} keys differ from params.yaml"
        )
    shard, model, data, train = s["shard"], s["model"], s["data"], s["train"]
    assert shard.dataset in READERS and shard.root  # type: ignore[attr-defined]
    assert model.num_classes == CLASSES[shard.dataset]  # type: ignore[attr-defined]
    model.to_danet_config(CLASSES[shard.dataset])  # type: ignore[attr-defined]  # backbone, grid
    assert data.train_split in shard.splits and data.val_split in shard.splits  # type: ignore[attr-defined]
    assert s["evaluate"].split == data.val_split  # type: ignore[attr-defined]
    assert data.crop_size in s["tune"].crop_sizes  # type: ignore[attr-defined]
    # the DVC paths are the default ones, so `cp configs/X.yaml params.yaml && dvc repro` works
    assert (shard.out, data.shards, train.out) == ("data/shards", "data/shards", "outputs/train")  # type: ignore[attr-defined]
    s["evaluate"].protocol()  # type: ignore[attr-defined]


def test_cityscapes_preset_is_the_papers_setting() -> None:
    s = load_all(ROOT / "configs" / "cityscapes.yaml")
    model, data, train = s["model"], s["data"], s["train"]
    assert (model.backbone, model.multi_grid) == ("resnet101d", (4, 8, 16))  # type: ignore[attr-defined]
    assert (data.crop_size, data.scale_min, data.scale_max) == (768, 0.75, 2.0)  # type: ignore[attr-defined]
    assert train.batch_size * train.num_workers == 8 and train.use_gpu  # type: ignore[attr-defined]
    assert train.lr == 0.003  # type: ignore[attr-defined]
    protocol = s["evaluate"].protocol()  # type: ignore[attr-defined]
    assert protocol.flip and len(protocol.scales) == 6
