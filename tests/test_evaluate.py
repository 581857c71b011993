"""Evaluation protocols (whole, sliding window, multi-scale, flip) and the evaluate stage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from danet.inference import Protocol, infer, scaled_size
from danet.model import SegmentationModel, Segmenter
from pipeline.artifacts.refs import load_model
from pipeline.cli import app
from pipeline.config import ConfigError, Params
from pipeline.data.manifest import load_manifest, shard_refs
from pipeline.errors import ModelError
from pipeline.evaluation.evaluate import candidates, evaluate_model, run_evaluation
from pipeline.sections import EvaluateParams
from pipeline.training.loop import validate
from tests.conftest import mean_of, write_model_file

runner = CliRunner()


class Pointwise(nn.Module):
    """A 1x1 conv: commutes with flips and crops, so every protocol must give its logits."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Recorder(nn.Module):
    """Records each window it is given (its size and the position its first pixel came from) and
    answers constant logits [0, ln 2]."""

    def __init__(self) -> None:
        super().__init__()
        self.windows: list[tuple[int, int, int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for window in x:  # windows come batched
            size = (window.shape[-2], window.shape[-1])
            self.windows.append(
                (*size, round(float(window[0, 0, 0]) * 100), round(float(window[1, 0, 0]) * 100))
            )
        out = torch.zeros(x.shape[0], 2, *x.shape[-2:])
        out[:, 1] = math.log(2)
        return out


def positions(h: int, w: int) -> torch.Tensor:
    """An image whose channels 0 and 1 hold each pixel's row and column / 100."""
    rows = torch.arange(h).float()[:, None].expand(h, w) / 100
    cols = torch.arange(w).float()[None, :].expand(h, w) / 100
    return torch.stack([rows, cols, torch.zeros(h, w)])[None]


def test_official_windows_as_the_code_places_them() -> None:
    """50x70, crop 32, one scale: stride int(32 x 2/3) = 21; ceil((50-32)/21)+1 = 2 rows and
    ceil((70-32)/21)+1 = 3 columns of windows at multiples of 21, the border ones black-padded."""
    model = Recorder()
    p = Protocol("official", "slide", crop=32)
    scores = infer(model, positions(50, 70), p)
    assert p.window_stride == 21 and len(model.windows) == 6
    assert sorted((t, left) for _, _, t, left in model.windows) == [
        (t, left) for t in (0, 21) for left in (0, 21, 42)
    ]
    assert {(h, w) for h, w, _, _ in model.windows} == {(32, 32)}
    torch.testing.assert_close(scores[0, :, 10, 10], torch.tensor([1.0, 2.0]))  # exp([0, ln 2])
    assert (
        Protocol("official", "slide", crop=32, scales=(0.5, 1.0)).window_stride == 16
    )  # 1/2 with MS


def test_mmseg_windows_as_slide_inference_places_them() -> None:
    """50x70, crop 32, stride 21: rows start at 0 and 18 (the last shifted back: 50 - 32), columns
    at 0, 21 and 38 (70 - 32); every window is a full crop, nothing is padded."""
    model = Recorder()
    p = Protocol("mmseg", "slide", crop=32, stride=21)
    scores = infer(model, positions(50, 70), p)
    assert sorted((t, left) for _, _, t, left in model.windows) == [
        (t, left) for t in (0, 18) for left in (0, 21, 38)
    ]
    assert {(h, w) for h, w, _, _ in model.windows} == {(32, 32)}
    torch.testing.assert_close(scores[0, :, 10, 10], torch.tensor([1 / 3, 2 / 3]))  # softmax


def test_fusion_by_hand() -> None:
    """Constant logits [0, ln 2]. Official: exp of (logits + flipped logits), summed over scales:
    [1, 4] with flip, [2, 4] over two scales. mmseg: the softmax [1/3, 2/3] averaged over every
    (scale, flip) variant stays [1/3, 2/3]."""
    x = torch.rand(1, 3, 20, 30)
    cases = {
        Protocol("official", flip=True): [1.0, 4.0],
        Protocol("official", scales=(0.5, 1.0)): [2.0, 4.0],
        Protocol("official", scales=(0.5, 1.0), flip=True): [2.0, 8.0],
        Protocol("mmseg", scales=(0.5, 1.0, 1.5), flip=True): [1 / 3, 2 / 3],
    }
    for protocol, expected in cases.items():
        scores = infer(Recorder(), x, protocol)
        assert scores.shape == (1, 2, 20, 30)
        torch.testing.assert_close(scores[0, :, 5, 7], torch.tensor(expected), msg=protocol.name)


def test_scaled_sizes_as_each_reference() -> None:
    official = Protocol("official", base_size=100)
    assert scaled_size(60, 80, 0.5, official) == (38, 50)  # long side ceil(100 x 0.5)
    assert scaled_size(1024, 2048, 2.2, Protocol("official", base_size=2048)) == (2253, 4506)
    # no base size: the image's own long side
    assert scaled_size(60, 80, 1.5, Protocol("official")) == (90, 120)
    ade = Protocol("mmseg", test_scale=(2048, 512))
    assert scaled_size(480, 640, 1.0, ade) == (512, 683)  # keep ratio inside 2048 x 512
    assert scaled_size(480, 640, 0.5, ade) == (256, 341)
    assert scaled_size(1024, 2048, 0.75, Protocol("mmseg")) == (768, 1536)  # 1.x: the image x r


def test_batched_windows_give_the_same_scores() -> None:
    model = build_tiny_segmenter()
    x = torch.rand(1, 3, 70, 90)
    with torch.no_grad():
        for reference in ("official", "mmseg"):
            one = infer(model, x, Protocol(reference, "slide", crop=32, window_batch=1))
            many = infer(model, x, Protocol(reference, "slide", crop=32, window_batch=5))
            torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-5)


def test_pointwise_model_gives_its_own_argmax_under_every_protocol() -> None:
    model = Pointwise()
    x = torch.rand(2, 3, 50, 70)
    expected = model(x).argmax(1)
    with torch.no_grad():
        for protocol in (
            Protocol("official", "slide", crop=24, stride=16, flip=True),
            Protocol("mmseg", "slide", crop=24, stride=16, flip=True),
            Protocol("official"),
        ):
            assert torch.equal(infer(model, x, protocol).argmax(1), expected), protocol.name


def test_mmseg_slide_with_a_crop_covering_the_image_equals_whole() -> None:
    model = build_tiny_segmenter()
    x = torch.rand(1, 3, 40, 56)
    with torch.no_grad():
        whole = infer(model, x, Protocol("mmseg"))
        slide = infer(model, x, Protocol("mmseg", "slide", crop=64))
    assert torch.equal(whole, slide)


def test_protocol_names_and_validation() -> None:
    assert Protocol().name == "official-whole"
    assert Protocol(mode="slide", crop=1024, scales=(0.5,) * 8, flip=True, base_size=2048).name == (
        "official-base2048-slide1024s512-ms8-flip"
    )
    assert (
        Protocol("mmseg", scales=(0.5, 1.0), flip=True, test_scale=(2048, 512)).name
        == "mmseg-2048x512-whole-ms2-flip"
    )
    with pytest.raises(ValueError, match=r"mode must be whole or slide"):
        Protocol(mode="tiles")
    with pytest.raises(ConfigError, match=r"evaluate.scales\[1\] must be > 0"):
        EvaluateParams(scales=(1.0, -0.5))
    with pytest.raises(ConfigError, match=r"evaluate.reference must be one of official \| mmseg"):
        EvaluateParams(reference="mine")


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
    matrix, rows = evaluate_model(
        loaded.module, 11, refs, Protocol(), torch.device("cpu"), num_overlays=2, progress=False
    )
    core = loaded.module.get_submodule("model")  # the SegmentationModel inside the Segmenter
    assert isinstance(core, SegmentationModel)
    segmenter = Segmenter(core, manifest.mean, manifest.std)  # as a training session builds it
    cm_train = validate(segmenter, refs, manifest.num_classes, torch.device("cpu"), workers=2)
    assert matrix.sum() == 4 * 64 * 48 - manifest.splits["val"].ignore_pixels
    assert torch.equal(matrix, cm_train.matrix)
    assert len(rows) == 2


@pytest.mark.slow
def test_evaluation_over_ray_workers_equals_one_process(
    tiny_shards: Path, tmp_path: Path, ray_cluster: None
) -> None:
    """Two Ray tasks, each reading and decoding its own shards once: the same confusion matrix."""
    model = write_model_file(tmp_path / "model.pt", tiny_shards)
    common = {"model": str(model), "shards": str(tiny_shards), "scales": (0.75, 1.0)}
    one = run_evaluation(EvaluateParams(**common, out=str(tmp_path / "one")))  # type: ignore[arg-type]
    two = run_evaluation(EvaluateParams(**common, out=str(tmp_path / "two"), workers=2))  # type: ignore[arg-type]
    assert two.miou == one.miou and two.iou_per_class == one.iou_per_class
    assert (tmp_path / "two" / "predictions.png").is_file()


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
    assert metrics["protocol"] == "official-whole-ms2-flip" and metrics["images"] == 4
    assert len(metrics["iou_per_class"]) == 11
    assert metrics["miou"] == pytest.approx(mean_of(metrics["iou_per_class"]))
    names = {"metrics.json", "per_class_iou.csv", "confusion_matrix.png", "predictions.png"}
    assert {p.name for p in out.iterdir()} == names
    assert "mIoU" in result.output and "Sky" in result.output


def test_pick_model_auto_takes_the_better_candidate(
    tiny_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.evaluation.evaluate import pick_model

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"evaluate.model is auto but none of"):
        pick_model("auto", candidates(Params()))
    for name, score in (("train", 0.4), ("tune", 0.6)):
        (tmp_path / "outputs" / name).mkdir(parents=True)
        write_model_file(tmp_path / "outputs" / name / "model.pt", tiny_shards, val_miou=score)
    assert pick_model("auto", candidates(Params())) == "outputs/tune/model.pt"


# --- bad input --------------------------------------------------------------------------------


def test_corrupt_checkpoint_is_one_line(tiny_shards: Path, tmp_path: Path) -> None:
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=r"model\.pt: not a valid DANet model file"):
        load_model(str(bad))


def test_class_mismatch_and_unknown_registry_uri(tiny_shards: Path, tmp_path: Path) -> None:
    from pipeline.data.readers import make_reader
    from pipeline.data.shard import shard_dataset
    from tests.conftest import write_image, write_label

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
