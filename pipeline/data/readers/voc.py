"""PASCAL VOC 2012: JPEGImages/ + SegmentationClass/ palette PNGs (21 classes, 255 = border).

``split`` is a list file of ImageSets/Segmentation/ (train, val, trainval), or ``train_aug`` /
``trainaug``: the SBD-augmented set in SegmentationClassAug/ (grayscale PNGs of class ids) with
ImageSets/Segmentation/{split}.txt, as mmsegmentation lays it out.
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
        label_dir = root / ("SegmentationClassAug" if "aug" in split else "SegmentationClass")
        require_dir(label_dir, f"VOC {label_dir.name}")
        ids = read_split_list(root / "ImageSets" / "Segmentation" / f"{split}.txt")
        items = []
        for name in sorted(set(ids)):
            label = label_dir / f"{name}.png"
            items.append(
                Item(name, str(images / f"{name}.jpg"), str(label) if label.exists() else None)
            )
        return non_empty(items, root, split)
