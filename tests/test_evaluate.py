"""Evaluation protocols (whole, sliding window, multi-scale, flip) and the evaluate stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from danet.inference import Protocol, infer, slide_logits
from pipeline.artifacts.refs import load_model
from pipeline.cli import app
from pipeline.config import ConfigError, EvaluateParams
from pipeline.data.loader import EvalStream, eval_loader
from pipeline.data.manifest import load_manifest, shard_refs
from pipeline.errors import ModelError
from pipeline.evaluation.evaluate import evaluate_model, run_evaluation
from pipeline.training.loop import validate
from tests.conftest import write_model_file

runner = CliRunner()


class Pointwise(nn.Module):
    """A 1x1 conv: commutes with flips and crops, so every protocol must give its logits."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_slide_with_crop_covering_image_equals_whole() -> None:
    model = build_tiny_segmenter()
    x = torch.rand(1, 3, 40, 56)
    with torch.no_grad():
        whole = infer(model, x, Protocol("whole"))
        slide = infer(model, x, Protocol("slide", crop=64))
    assert torch.equal(whole, slide)


def test_slide_windows_average_to_whole_for_a_pointwise_model() -> None:
    model = Pointwise()
    x = torch.rand(2, 3, 50, 70)
    with torch.no_grad():
        whole = model(x)
        slide = slide_logits(model, x, crop=24, stride=16)  # overlapping windows, padded edge
    torch.testing.assert_close(slide, whole)


def test_flip_of_a_symmetric_model_changes_nothing() -> None:
    model = Pointwise()
    x = torch.rand(1, 3, 33, 47)
    with torch.no_grad():
        plain = infer(model, x, Protocol("whole"))
        flipped = infer(model, x, Protocol("whole", flip=True))
    torch.testing.assert_close(flipped, 2 * plain)  # summed logits: same argmax
    assert torch.equal(flipped.argmax(1), plain.argmax(1))


def test_multi_scale_sums_logits_at_full_resolution() -> None:
    model = Pointwise()
    x = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        ms = infer(model, x, Protocol("whole", scales=(0.5, 1.0, 1.5), flip=True))
    assert ms.shape == (1, 4, 32, 48)
    with torch.no_grad():
        single = infer(model, x, Protocol("whole", scales=(1.0, 1.0)))
    torch.testing.assert_close(single, 2 * model(x))


def test_protocol_names_and_validation() -> None:
    assert Protocol().name == "whole"
    assert Protocol("slide", 512, scales=(0.5, 1.0), flip=True).name == "slide512-ms2-flip"
    with pytest.raises(ValueError, match=r"evaluate.mode must be whole or slide"):
        Protocol("tiles")
    with pytest.raises(ConfigError, match=r"evaluate.scales\[1\] must be > 0"):
        EvaluateParams(scales=(1.0, -0.5))


def build_tiny_segmenter() -> nn.Module:
    from danet import DANetConfig, build_danet
    from danet.model import Segmenter

    torch.manual_seed(0)
    return Segmenter(
        build_danet(DANetConfig(4, backbone="resnet18d")), [0.5] * 3, [0.25] * 3
    ).eval()


def test_single_scale_evaluation_equals_in_training_evaluation(
    tiny_shards: Path, tmp_path: Path
) -> None:
    """The evaluate stage (Segmenter from model.pt) and the training loop's evaluate agree."""
    path = write_model_file(tmp_path / "model.pt", tiny_shards)
    loaded = load_model(str(path))
    manifest = load_manifest(tiny_shards)
    refs = shard_refs(manifest, "val")
    cm_stage, rows = evaluate_model(
        loaded, refs, Protocol(), torch.device("cpu"), 2, progress=False
    )
    core = loaded.module.get_submodule("model")  # the SegmentationModel inside the Segmenter
    stream = EvalStream(refs, manifest.mean, manifest.std)
    cm_train = validate(core, eval_loader(stream, 0), manifest.num_classes, torch.device("cpu"))
    assert cm_stage.matrix.sum() == 4 * 64 * 48 - manifest.splits["val"].ignore_pixels
    assert torch.equal(cm_stage.matrix, cm_train.matrix)
    assert len(rows) == 2


def test_evaluate_cli_writes_report(tiny_shards: Path, tmp_path: Path) -> None:
    model = write_model_file(tmp_path / "model.pt", tiny_shards, val_miou=0.5)
    params = tmp_path / "params.yaml"
    out = tmp_path / "eval"
    params.write_text(
        f"evaluate: {{model: {model}, shards: {tiny_shards}, out: {out}, scales: [0.75, 1.0], flip: true}}\n"
        f"mlflow: {{tracking_uri: 'sqlite:///{tmp_path / 'mlflow.db'}'}}\n"
    )
    result = runner.invoke(app, ["evaluate", "--params", str(params)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"] == "whole-ms2-flip" and metrics["images"] == 4
    assert 0 <= metrics["miou"] <= 1 and len(metrics["iou_per_class"]) == 11
    assert {p.name for p in out.iterdir()} == {
        "metrics.json", "per_class_iou.csv", "confusion_matrix.png", "predictions.png",
    }  # fmt: skip
    assert "mIoU" in result.output and "Sky" in result.output


def test_pick_model_auto_takes_the_better_candidate(
    tiny_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.evaluation.evaluate import pick_model

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"evaluate.model is auto but none of"):
        pick_model("auto")
    for name, score in (("train", 0.4), ("tune", 0.6)):
        (tmp_path / "outputs" / name).mkdir(parents=True)
        write_model_file(tmp_path / "outputs" / name / "model.pt", tiny_shards, val_miou=score)
    assert pick_model("auto") == "outputs/tune/model.pt"


# --- bad input --------------------------------------------------------------------------------


def test_corrupt_checkpoint_is_one_line(tiny_shards: Path, tmp_path: Path) -> None:
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=r"model\.pt: not a valid DANet model file"):
        load_model(str(bad))


def test_class_mismatch_and_unknown_registry_uri(tiny_shards: Path, tmp_path: Path) -> None:
    from pipeline.data.readers import make_reader
    from pipeline.data.shard import shard_dataset
    from tests.test_datasets import write_image, write_label

    # a 2-class folder dataset: the 11-class model does not fit it
    root = tmp_path / "folder"
    (root / "images" / "val").mkdir(parents=True)
    (root / "masks" / "val").mkdir(parents=True)
    (root / "classes.txt").write_text("background\nthing\n")
    write_image(root / "images" / "val" / "a.png", 32, 24)
    write_label(root / "masks" / "val" / "a.png", torch.zeros(24, 32, dtype=torch.uint8).numpy())

    shard_dataset(make_reader("folder", root), ("val",), tmp_path / "two")
    model = write_model_file(tmp_path / "model.pt", tiny_shards)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ConfigError, match=r"the model has 11 classes .* but .* has 2"):
        run_evaluation(EvaluateParams(model=str(model), shards=str(tmp_path / "two")), uri)
    with pytest.raises(ModelError, match=r"models:/nope@champion: cannot load the model"):
        load_model("models:/nope@champion", uri)
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--params",
            str(write_params(tmp_path, uri, tiny_shards)),
            "--model",
            "models:/nope@champion",
        ],
    )
    assert result.exit_code == 2
    assert (
        result.output.strip()
        .splitlines()[-1]
        .startswith("error: models:/nope@champion: cannot load the model")
    )


def write_params(tmp_path: Path, uri: str, shards: Path) -> Path:
    params = tmp_path / "params.yaml"
    params.write_text(f"mlflow: {{tracking_uri: '{uri}'}}\nevaluate: {{shards: {shards}}}\n")
    return params
