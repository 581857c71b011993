"""Every reader on a tiny copy of its published layout, written here (no others' data shipped)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.readers import READERS, Reader, make_reader
from pipeline.data.readers.scene import render_scene
from pipeline.data.readers.synthetic import SyntheticReader
from pipeline.errors import ConfigError, DataError
from tests.conftest import CAMVID, label_grid, write_image, write_label


def read_all(reader: Reader, split: str) -> dict[str, np.ndarray]:
    return {it.key: reader.read(it).train_ids for it in reader.items(split)}


def test_cityscapes_label_ids_mapped_and_train_ids_preferred(tmp_path: Path) -> None:
    img = tmp_path / "leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png"
    write_image(img)
    raw = label_grid(
        [7, 26, 0, 33, 24, 18, 31, 4]
    )  # road car unlabeled bicycle person polegroup train
    write_label(tmp_path / "gtFine/val/aachen/aachen_000000_000019_gtFine_labelIds.png", raw)
    write_image(tmp_path / "leftImg8bit/val/bonn/bonn_000001_000019_leftImg8bit.png")
    write_label(
        tmp_path / "gtFine/val/bonn/bonn_000001_000019_gtFine_labelIds.png", label_grid([7])
    )
    write_label(
        tmp_path / "gtFine/val/bonn/bonn_000001_000019_gtFine_labelTrainIds.png",
        label_grid([5, 255]),
    )
    labels = read_all(make_reader("cityscapes", tmp_path), "val")
    assert list(labels) == ["aachen_000000_000019", "bonn_000001_000019"]
    expected = label_grid([0, 13, 255, 18, 11, 255, 16, 255])
    assert np.array_equal(labels["aachen_000000_000019"], expected)
    assert np.array_equal(labels["bonn_000001_000019"], label_grid([5, 255]))  # trainIds used as is
    assert make_reader("cityscapes", tmp_path).info.num_classes == 19


def test_voc_palette_png_gives_indices_not_colours(tmp_path: Path) -> None:
    root = tmp_path / "VOC2012"
    (root / "ImageSets/Segmentation").mkdir(parents=True)
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000032\n")
    write_image(root / "JPEGImages/2007_000032.jpg", fmt="JPEG")
    write_label(
        root / "SegmentationClass/2007_000032.png", label_grid([0, 15, 255, 20]), palette=True
    )
    assert Image.open(root / "SegmentationClass/2007_000032.png").mode == "P"
    labels = read_all(make_reader("voc", root), "val")
    assert np.array_equal(labels["2007_000032"], label_grid([0, 15, 255, 20]))
    # mmseg's trainaug.txt: VOC's own label where it has one (train), SBD's otherwise.
    write_image(root / "JPEGImages/2008_000099.jpg", fmt="JPEG")
    (root / "ImageSets/Segmentation/trainaug.txt").write_text("2007_000032\n2008_000099\n")
    write_label(root / "SegmentationClassAug/2007_000032.png", label_grid([1, 2]))  # not used
    write_label(root / "SegmentationClassAug/2008_000099.png", label_grid([3, 4]))
    aug = read_all(make_reader("voc", root), "trainaug")
    assert np.array_equal(aug["2007_000032"], label_grid([0, 15, 255, 20]))
    assert np.array_equal(aug["2008_000099"], label_grid([3, 4]))


def test_pascal_context_reduces_zero_label(tmp_path: Path) -> None:
    root = tmp_path / "VOC2010"
    (root / "ImageSets/SegmentationContext").mkdir(parents=True)
    (root / "ImageSets/SegmentationContext/train.txt").write_text("2008_000002\n")
    write_image(root / "JPEGImages/2008_000002.jpg", fmt="JPEG")
    write_label(root / "SegmentationClassContext/2008_000002.png", label_grid([0, 1, 59, 30]))
    reader = make_reader("pascal_context", root)
    assert reader.info.num_classes == 59
    assert np.array_equal(read_all(reader, "train")["2008_000002"], label_grid([255, 0, 58, 29]))


def test_cocostuff_maps_171_used_ids(tmp_path: Path) -> None:
    write_image(tmp_path / "images/val2017/000000000139.jpg", fmt="JPEG")
    raw = label_grid([0, 11, 12, 90, 91, 181, 255, 89])
    write_label(tmp_path / "stuffthingmaps/val2017/000000000139.png", raw)
    reader = make_reader("cocostuff", tmp_path)
    assert reader.info.num_classes == 171
    # person=0; 11 (unused id 12) ignored; 12 (stop sign, id 13) -> 11; 90 unused; 91 (banner) -> 80
    expected = label_grid([0, 255, 11, 255, 80, 170, 255, 79])
    assert np.array_equal(read_all(reader, "val2017")["000000000139"], expected)
    assert reader.info.classes[80] == "banner" and reader.info.classes[79] == "toothbrush"


def test_cocostuff10k_reads_the_published_mat_files(tmp_path: Path) -> None:
    """cocostuff-10k-v1.1: S holds COCO ids (1-based), 0 = unlabelled; as mmseg's converter."""
    from scipy.io import savemat

    write_image(tmp_path / "images/COCO_train2014_000000000077.jpg", fmt="JPEG")
    (tmp_path / "annotations").mkdir()
    raw = label_grid([0, 1, 12, 13, 92, 182, 91, 90]).astype(np.uint16)
    savemat(tmp_path / "annotations/COCO_train2014_000000000077.mat", {"S": raw})
    (tmp_path / "imageLists").mkdir()
    (tmp_path / "imageLists/train.txt").write_text("COCO_train2014_000000000077\n")
    reader = make_reader("cocostuff10k", tmp_path)
    # none; person=0; 12 unused; 13 (stop sign) -> 11; 92 (banner) -> 80; 182 (wood) -> 170;
    # 91 unused; 90 (toothbrush) -> 79
    expected = label_grid([255, 0, 255, 11, 80, 170, 255, 79])
    assert np.array_equal(read_all(reader, "train")["COCO_train2014_000000000077"], expected)
    assert reader.info.num_classes == 171 and reader.info.name == "cocostuff10k"


def test_ade20k_reduces_zero_label(tmp_path: Path) -> None:
    write_image(tmp_path / "images/validation/ADE_val_00000001.jpg", fmt="JPEG")
    write_label(tmp_path / "annotations/validation/ADE_val_00000001.png", label_grid([0, 1, 150]))
    reader = make_reader("ade20k", tmp_path)
    assert reader.info.num_classes == 150
    assert np.array_equal(
        read_all(reader, "validation")["ADE_val_00000001"], label_grid([255, 0, 149])
    )


def test_camvid_pairs_by_stem_and_ignores_11(tmp_path: Path) -> None:
    write_image(tmp_path / "train/0001TP_006690.jpg", fmt="JPEG")  # any image extension
    write_label(tmp_path / "trainannot/0001TP_006690.png", label_grid([0, 11, 10, 3]))
    labels = read_all(make_reader("camvid", tmp_path), "train")
    assert np.array_equal(labels["0001TP_006690"], label_grid([0, 255, 10, 3]))


def test_folder_reader_with_class_file(tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("background\nroad 128 64 128\ncar\n")
    write_image(tmp_path / "images/train/a.png")
    write_label(tmp_path / "masks/train/a.png", label_grid([0, 1, 2, 255]))
    reader = make_reader("folder", tmp_path)
    assert reader.info.classes == ("background", "road", "car")
    assert reader.info.palette[1] == (128, 64, 128)
    assert np.array_equal(read_all(reader, "train")["a"], label_grid([0, 1, 2, 255]))


def test_synthetic_is_deterministic_and_varied() -> None:
    reader = SyntheticReader(num_samples={"train": 3, "val": 2}, width=96, height=64, seed=3)
    items = reader.items("train")
    a, b = reader.read(items[0]), reader.read(items[0])
    assert a.image_bytes == b.image_bytes and np.array_equal(a.train_ids, b.train_ids)
    assert reader.read(items[1]).image_bytes != a.image_bytes
    _, label = render_scene(0, 160, 120)
    present = set(np.unique(label).tolist())
    assert {0, 1, 3, 4, 8} <= present  # sky, building, road, pavement, car in every scene
    assert reader.info.name == "synthetic" and reader.info.num_classes == 11


@pytest.mark.skipif(not CAMVID.is_dir(), reason="../shared/data/camvid not present")
def test_camvid_reader_on_shared_data() -> None:
    reader = make_reader("camvid", CAMVID)
    train, val = reader.items("train"), reader.items("val")
    assert (len(train), len(val)) == (367, 101)
    label = reader.read(val[0]).train_ids
    assert label.shape == (360, 480)
    assert set(np.unique(label).tolist()) <= {*range(11), 255}


def test_every_reader_is_registered() -> None:
    assert set(READERS) == {
        "cityscapes",
        "voc",
        "pascal_context",
        "cocostuff",
        "cocostuff10k",
        "ade20k",
        "camvid",
        "folder",
        "synthetic",
    }
    with pytest.raises(ConfigError, match=r"shard.dataset 'kitti' is unknown"):
        make_reader("kitti", "/tmp")


# --- bad input: each names the file and the problem --------------------------------------------


@pytest.fixture
def camvid_root(tmp_path: Path) -> Path:
    for i in range(3):
        write_image(tmp_path / f"val/img{i}.png")
        write_label(tmp_path / f"valannot/img{i}.png", label_grid([1, 2, 11]))
    return tmp_path


def _read_error(root: Path) -> str:
    reader = make_reader("camvid", root)
    with pytest.raises(DataError) as info:
        for item in reader.items("val"):
            reader.read(item)
    return str(info.value)


def test_truncated_image(camvid_root: Path) -> None:
    path = camvid_root / "val/img1.png"
    path.write_bytes(path.read_bytes()[:60])
    assert _read_error(camvid_root).startswith(f"{path}: unreadable or truncated image")


def test_label_size_mismatch(camvid_root: Path) -> None:
    write_label(camvid_root / "valannot/img2.png", label_grid([1], h=5, w=8))
    msg = _read_error(camvid_root)
    assert "valannot/img2.png: label is 8x5 but its image is 8x6" in msg


def test_label_value_outside_classes(camvid_root: Path) -> None:
    write_label(camvid_root / "valannot/img0.png", label_grid([1, 40]))
    assert "valannot/img0.png: label value 40 is outside CamVid's 0..11" in _read_error(camvid_root)


def test_image_without_label(camvid_root: Path) -> None:
    (camvid_root / "valannot/img1.png").unlink()
    assert "val/img1.png: image has no label file" in _read_error(camvid_root)


def test_empty_and_missing_root(tmp_path: Path) -> None:
    (tmp_path / "val").mkdir()
    (tmp_path / "valannot").mkdir()
    with pytest.raises(DataError, match="no images found for split 'val'"):
        make_reader("camvid", tmp_path).items("val")
    with pytest.raises(DataError, match="dataset root does not exist"):
        make_reader("camvid", tmp_path / "nope")


def test_label_less_splits_are_images_only_and_half_labelled_ones_fail(tmp_path: Path) -> None:
    """VOC's test list without SegmentationClass/, a folder split without masks/, the synthetic
    test split: every item unlabelled, read as images only. A folder split missing one mask
    still fails on that image."""
    from pipeline.data.readers.base import images_only

    voc = tmp_path / "VOC2012"
    write_image(voc / "JPEGImages/2008_000001.jpg", fmt="JPEG")
    (voc / "ImageSets/Segmentation").mkdir(parents=True)
    (voc / "ImageSets/Segmentation/test.txt").write_text("2008_000001\n")
    folder = tmp_path / "folder"
    (folder / "classes.txt").parent.mkdir(parents=True)
    (folder / "classes.txt").write_text("a\nb\n")
    for name in ("x", "y"):
        write_image(folder / f"images/test/{name}.png")
        write_image(folder / f"images/val/{name}.png")
    write_label(folder / "masks/val/x.png", label_grid([0, 1]))
    readers = (
        (make_reader("voc", voc), "test"),
        (make_reader("folder", folder), "test"),
        (SyntheticReader(num_samples={"test": 2}, width=32, height=32), "test"),
    )
    for reader, split in readers:
        items = reader.items(split)
        assert items and images_only(items), type(reader).__name__
        sample = reader.read(items[0], images_only=True)
        assert sample.label is None and sample.image_bytes
    half = make_reader("folder", folder).items("val")
    assert not images_only(half)
    reader = make_reader("folder", folder)
    assert reader.read(half[0]).label is not None
    with pytest.raises(DataError, match="image has no label file"):
        reader.read(half[1])
