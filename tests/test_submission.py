"""Benchmark-server output: label-less splits, images-only shards, Cityscapes labelIds, VOC PNGs.

The Cityscapes frames are in the published layout (leftImg8bit/ + gtFine/ with labelIds holding
every id 0..33, instanceIds and colour files beside them, placeholder labels under gtFine/test),
and the official evaluation script (cityscapesscripts' evalPixelLevelSemanticLabeling, what the
server runs) is the judge of the files ``danet predict --format cityscapes`` writes.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner, Result

from pipeline.cli import app
from pipeline.data.manifest import load_manifest
from pipeline.data.readers import make_reader
from pipeline.data.readers.base import load_label_array
from pipeline.data.readers.cityscapes import CITYSCAPES_CLASSES, LABEL_ID_TO_TRAIN_ID
from pipeline.data.readers.scene import render_scene
from pipeline.data.shard import shard_dataset
from pipeline.use.formats import FORMATS, cityscapes_name, to_label_ids, voc_picture
from tests.conftest import write_model_file

EVALUATED_IDS = [label_id for _, label_id, _ in CITYSCAPES_CLASSES]
VAL_FRAMES = ("frankfurt_000000_000294", "munster_000012_000019")
TEST_FRAMES = ("berlin_000000_000019", "bonn_000004_000019")


def danet(*args: object) -> Result:
    """``danet ARGS...`` in this process."""
    return CliRunner().invoke(app, [str(a) for a in args])


def label_ids(width: int, height: int, seed: int) -> np.ndarray:
    """Every Cityscapes id 0..33 as vertical bands over the top half, random ids below."""
    rng = np.random.default_rng(seed)
    ids = np.empty((height, width), dtype=np.uint8)
    ids[: height // 2] = (np.arange(width) * 34 // width).astype(np.uint8)
    ids[height // 2 :] = rng.integers(0, 34, size=(height - height // 2, width))
    return ids


def cityscapes_tree(root: Path, width: int = 2048, height: int = 1024) -> Path:
    """Val frames with labels, test frames with gtFine/test placeholders (not PNGs at all: a
    reader that opened them would fail)."""
    for split, frames in (("val", VAL_FRAMES), ("test", TEST_FRAMES)):
        for i, frame in enumerate(frames):
            city = frame.split("_")[0]
            image_dir, label_dir = (
                root / "leftImg8bit" / split / city,
                root / "gtFine" / split / city,
            )
            image_dir.mkdir(parents=True, exist_ok=True)
            label_dir.mkdir(parents=True, exist_ok=True)
            rgb, _ = render_scene(i + 7 * len(split), 256, 128)
            Image.fromarray(rgb).resize((width, height)).save(
                image_dir / f"{frame}_leftImg8bit.png"
            )
            gt = label_dir / f"{frame}_gtFine_labelIds.png"
            if split == "test":
                gt.write_bytes(b"placeholder, as gtFine/test holds no annotation")
                continue
            ids = label_ids(width, height, i)
            Image.fromarray(ids).save(gt)
            Image.fromarray(ids.astype(np.uint16) * 1000).save(
                label_dir / f"{frame}_gtFine_instanceIds.png"
            )
            Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(
                label_dir / f"{frame}_gtFine_color.png"
            )
    return root


def official_scores(predictions: Path, gt_files: list[Path]) -> dict:
    """cityscapesscripts' evaluation of the predictions folder: each ground truth file's
    prediction found by the server's name pattern, then scored."""
    evaluation = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    args = evaluation.args
    args.evalInstLevelScore, args.JSONOutput, args.quiet = False, False, True
    args.predictionPath, args.predictionWalk = str(predictions), None
    found = [evaluation.getPrediction(args, str(gt)) for gt in gt_files]
    return evaluation.evaluateImgLists(found, [str(gt) for gt in gt_files], args)


def test_label_ids_round_trip_on_a_full_size_frame(tmp_path: Path) -> None:
    """labelIds -> the reader's train ids -> the written labelIds: every evaluated pixel keeps
    its id, every other one becomes 0 (unlabeled, ignored by the server), reading the written
    file back gives the same train ids, and the official script scores it 1.0 on all 19."""
    root = cityscapes_tree(tmp_path / "cityscapes")
    reader = make_reader("cityscapes", root)
    items = reader.items("val")
    assert [it.key for it in items] == sorted(VAL_FRAMES)
    out = tmp_path / "pred"
    out.mkdir()
    for item in items:
        original = load_label_array(item.label or "")
        assert original.shape == (1024, 2048) and set(np.unique(original)) == set(range(34))
        train_ids = reader.read(item).train_ids
        evaluated = np.isin(original, EVALUATED_IDS)
        assert (train_ids[~evaluated] == 255).all() and (train_ids[evaluated] < 19).all()
        files = FORMATS["cityscapes"].files(item.key, np.zeros(0), train_ids, ())
        assert list(files) == [f"{item.key}_leftImg8bit.png"]
        files[f"{item.key}_leftImg8bit.png"].save(out / f"{item.key}_leftImg8bit.png")
        written = np.array(Image.open(out / f"{item.key}_leftImg8bit.png"))
        assert written.dtype == np.uint8 and written.shape == original.shape
        assert (written[evaluated] == original[evaluated]).all()
        assert (written[~evaluated] == 0).all()
        assert (LABEL_ID_TO_TRAIN_ID[written] == train_ids).all()
    result = official_scores(out, [Path(it.label or "") for it in items])
    scores = {name: result["classScores"][name] for name, _, _ in CITYSCAPES_CLASSES}
    assert scores == {name: 1.0 for name in scores}
    assert result["averageScoreClasses"] == 1.0


def test_the_test_split_is_sharded_images_only_and_evaluate_refuses_it(tmp_path: Path) -> None:
    root = cityscapes_tree(tmp_path / "cityscapes", 256, 128)
    manifest = shard_dataset(make_reader("cityscapes", root), ("val", "test"), tmp_path / "s")
    assert manifest.splits["val"].labelled and not manifest.splits["test"].labelled
    assert manifest.splits["test"].samples == 2 and sum(manifest.splits["test"].class_pixels) == 0
    assert manifest.normalization_split == "val"  # the labelled split, not the test set
    on_disk = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert on_disk["splits"]["test"]["labelled"] is False
    assert not load_manifest(tmp_path / "s").splits["test"].labelled
    with tarfile.open(tmp_path / "s" / "test-000000.tar") as tar:
        names = tar.getnames()
    assert sorted(names) == sorted(f"{f}.{ext}" for f in TEST_FRAMES for ext in ("json", "png"))
    model = write_model_file(tmp_path / "model.pt", tmp_path / "s")
    result = danet(
        "evaluate",
        "--model",
        str(model),
        "--set",
        f"evaluate.shards={tmp_path / 's'}",
        "--split",
        "test",
        "--out",
        str(tmp_path / "eval"),
    )
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "holds images only" in result.output
    assert "evaluate.split" in result.output and not (tmp_path / "eval").exists()
    result = danet(
        "train",
        "--set",
        f"data.shards={tmp_path / 's'}",
        "--set",
        "data.train_split=test",
        "--set",
        f"train.out={tmp_path / 'train'}",
    )
    assert result.exit_code == 2 and "data.train_split needs a labelled split" in result.output


def test_predict_cityscapes_from_shards_scores_as_the_official_script(tmp_path: Path) -> None:
    """``danet predict --format cityscapes`` from shards: the test split gives one labelIds PNG
    per frame under the server's names; on val, the official script's mIoU over the files
    equals ``danet evaluate``'s under the same protocol (sliding window, two scales)."""
    root = cityscapes_tree(tmp_path / "cityscapes", 256, 128)
    shards = tmp_path / "s"
    shard_dataset(make_reader("cityscapes", root), ("val", "test"), shards)
    model = str(write_model_file(tmp_path / "model.pt", shards, seed=3))
    protocol = ["--set", "predict.mode=slide", "--set", "predict.crop=96"]
    protocol += ["--scales", "0.75,1.0", "--no-flip"]
    predict = ("predict", "--model", model, "--shards", shards, "--format", "cityscapes", *protocol)
    test_out = tmp_path / "test_pred"
    result = danet(*predict, "--out", test_out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in test_out.iterdir()) == [cityscapes_name(f) for f in TEST_FRAMES]
    for path in test_out.iterdir():
        with Image.open(path) as im:
            assert im.mode == "L" and im.size == (256, 128)
            assert set(np.unique(np.array(im))) <= set(EVALUATED_IDS)

    val_out = tmp_path / "val_pred"
    result = danet(*predict, "--split", "val", "--out", val_out)
    assert result.exit_code == 0, result.output
    result = danet(
        "evaluate",
        "--model",
        model,
        "--set",
        f"evaluate.shards={shards}",
        "--split",
        "val",
        "--mode",
        "slide",
        "--set",
        "evaluate.crop=96",
        "--scales",
        "0.75,1.0",
        "--no-flip",
        "--out",
        str(tmp_path / "eval"),
    )
    assert result.exit_code == 0, result.output
    ours = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    gt = sorted((root / "gtFine" / "val").rglob("*_gtFine_labelIds.png"))
    official = official_scores(val_out, gt)
    assert official["averageScoreClasses"] == pytest.approx(ours["miou"], abs=1e-9)
    for name, _, _ in CITYSCAPES_CLASSES:
        theirs, mine = official["classScores"][name], ours["iou_per_class"][name]
        assert (mine is None and np.isnan(theirs)) or theirs == pytest.approx(mine, abs=1e-9)


def test_voc_format_writes_palette_pngs_of_class_indices(tmp_path: Path) -> None:
    pred = (np.arange(21 * 8, dtype=np.uint8).reshape(8, 21) % 21).astype(np.uint8)
    voc_picture(pred).save(tmp_path / "2008_000001.png")
    with Image.open(tmp_path / "2008_000001.png") as im:
        assert im.mode == "P"
        assert (np.array(im) == pred).all()
        palette = im.getpalette()
    assert palette is not None
    assert palette[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]  # background, aeroplane, bicycle
    assert palette[255 * 3 : 256 * 3] == [224, 224, 192]  # VOC's border colour


def test_server_formats_refuse_a_model_of_other_classes(tmp_path: Path, tiny_shards: Path) -> None:
    model = write_model_file(tmp_path / "model.pt", tiny_shards)
    for fmt, count in (("cityscapes", 19), ("voc", 21)):
        result = danet(
            "predict",
            "--model",
            str(model),
            "--shards",
            str(tiny_shards),
            "--split",
            "val",
            "--format",
            fmt,
            "--out",
            str(tmp_path / fmt),
        )
        assert result.exit_code == 2, result.output
        assert f"predict.format {fmt}" in result.output and f"not the {count}" in result.output
        assert not (tmp_path / fmt).exists()


def test_predict_takes_files_or_shards_not_both(tmp_path: Path, tiny_shards: Path) -> None:
    model = write_model_file(tmp_path / "model.pt", tiny_shards)
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(image)
    base = ["predict", "--model", str(model), "--out", str(tmp_path / "o")]
    both = danet(*base, str(image), "--shards", str(tiny_shards))
    neither = danet(*base)
    for result in (both, neither):
        assert result.exit_code == 2 and result.output.startswith("error: danet predict:")
    result = danet(*base, "--shards", str(tiny_shards), "--split", "val")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert len(names) == 3 * 4 and names[0] == "synthetic_val_000000_labels.png"


def test_label_ids_table_is_the_official_one() -> None:
    labels = pytest.importorskip("cityscapesscripts.helpers.labels")
    official = {label.trainId: label.id for label in labels.labels if 0 <= label.trainId < 255}
    assert {t: int(to_label_ids(np.array([t], np.uint8))[0]) for t in range(19)} == official
    assert int(to_label_ids(np.array([255], np.uint8))[0]) == 0
