"""PASCAL VOC 2012: JPEGImages/ + SegmentationClass/ palette PNGs (21 classes, 255 = border).

``split`` names a list file of ImageSets/Segmentation/: VOC's own train, val and trainval, or
``trainaug``, the 10,582 images of the SBD-augmented train set that mmsegmentation's converter
(tools/dataset_converters/voc_aug.py) writes, with SegmentationClassAug/ (grayscale PNGs of class
ids). An image's label comes from SegmentationClass/ when VOC has one (the 1,464 train images,
with their 255 borders) and from SegmentationClassAug/ otherwise: the same union mmsegmentation
trains on (SegmentationClass + train.txt and SegmentationClassAug + aug.txt). ``test`` (the
1,456 images of VOC2012test.tar, no labels) is sharded images only, for the evaluation server.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.data.readers.base import (
    DataError,
    DatasetInfo,
    Item,
    Reader,
    bitwise_palette,
    non_empty,
    require_dir,
)

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


def read_split_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(path, "split list does not exist")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


@dataclass
class VOCReader(Reader):
    def __post_init__(self) -> None:
        self.info = DatasetInfo(
            "voc", VOC_CLASSES, bitwise_palette(21), "255 (object borders) = ignore"
        )

    def items(self, split: str) -> list[Item]:
        root = require_dir(Path(self.root), "VOC2012")
        images = require_dir(root / "JPEGImages", "VOC JPEGImages")
        if split == "test":  # VOC2012test.tar has no SegmentationClass/: images only
            label_dirs = [root / "SegmentationClass"]
        else:
            label_dirs = [require_dir(root / "SegmentationClass", "VOC SegmentationClass")]
        if split == "trainaug":
            label_dirs.append(
                require_dir(root / "SegmentationClassAug", "VOC SegmentationClassAug")
            )
        ids = read_split_list(root / "ImageSets" / "Segmentation" / f"{split}.txt")
        items = []
        for name in sorted(set(ids)):
            label = next(
                (d / f"{name}.png" for d in label_dirs if (d / f"{name}.png").exists()), None
            )
            items.append(Item(name, str(images / f"{name}.jpg"), str(label) if label else None))
        return non_empty(items, root, split)
