"""Cityscapes: leftImg8bit/{split}/{city}/*_leftImg8bit.png + gtFine/{split}/{city}/*_gtFine_*.png.

The ``test`` split is images only: gtFine/test ships placeholder label files (no annotation; the
benchmark server holds the real ones), which are never read. Labels are
``*_gtFine_labelTrainIds.png`` when present (made by cityscapesscripts'
createTrainIdLabelImgs), else ``*_gtFine_labelIds.png`` mapped to the 19 train ids with the table
of cityscapesscripts/helpers/labels.py (every other id -> 255).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.readers.base import (
    DataError,
    DatasetInfo,
    Item,
    Reader,
    list_images,
    lookup_table,
    non_empty,
    pair_by_stem,
    require_dir,
)

# (name, labelId, colour) of the 19 evaluated classes, in train-id order (labels.py).
CITYSCAPES_CLASSES = (
    ("road", 7, (128, 64, 128)),
    ("sidewalk", 8, (244, 35, 232)),
    ("building", 11, (70, 70, 70)),
    ("wall", 12, (102, 102, 156)),
    ("fence", 13, (190, 153, 153)),
    ("pole", 17, (153, 153, 153)),
    ("traffic light", 19, (250, 170, 30)),
    ("traffic sign", 20, (220, 220, 0)),
    ("vegetation", 21, (107, 142, 35)),
    ("terrain", 22, (152, 251, 152)),
    ("sky", 23, (70, 130, 180)),
    ("person", 24, (220, 20, 60)),
    ("rider", 25, (255, 0, 0)),
    ("car", 26, (0, 0, 142)),
    ("truck", 27, (0, 0, 70)),
    ("bus", 28, (0, 60, 100)),
    ("train", 31, (0, 80, 100)),
    ("motorcycle", 32, (0, 0, 230)),
    ("bicycle", 33, (119, 11, 32)),
)
LABEL_ID_TO_TRAIN_ID = lookup_table({lid: i for i, (_, lid, _) in enumerate(CITYSCAPES_CLASSES)})
MAX_LABEL_ID = 33  # ids 0..33; license plate (-1) is never stored in the PNGs
# train id -> labelId, what the benchmark server reads; 255 (ignore) -> 0 (unlabeled)
TRAIN_ID_TO_LABEL_ID = np.zeros(256, dtype=np.uint8)
TRAIN_ID_TO_LABEL_ID[: len(CITYSCAPES_CLASSES)] = [lid for _, lid, _ in CITYSCAPES_CLASSES]


@dataclass
class CityscapesReader(Reader):
    UNLABELLED_SPLITS = ("test",)

    def __post_init__(self) -> None:
        self.info = DatasetInfo(
            "cityscapes",
            tuple(c[0] for c in CITYSCAPES_CLASSES),
            tuple(c[2] for c in CITYSCAPES_CLASSES),
            "labelIds outside the 19 train ids -> 255",
        )

    def items(self, split: str) -> list[Item]:
        images = require_dir(
            Path(self.root) / "leftImg8bit" / split, "Cityscapes leftImg8bit/" + split
        )
        labels = Path(self.root) / "gtFine" / split

        def label_for(image: Path) -> Path:
            if split in self.UNLABELLED_SPLITS:
                return labels / "never-read"  # does not exist: the item has no label
            stem = image.name.replace("_leftImg8bit.png", "")
            train_ids = labels / image.parent.name / f"{stem}_gtFine_labelTrainIds.png"
            return (
                train_ids
                if train_ids.exists()
                else train_ids.with_name(f"{stem}_gtFine_labelIds.png")
            )

        found = [
            p for p in list_images(images, recursive=True) if p.name.endswith("_leftImg8bit.png")
        ]
        items = pair_by_stem(
            found, label_for, key_for=lambda p: p.name.replace("_leftImg8bit.png", "")
        )
        return non_empty(items, images, split)

    def convert_label(self, raw: np.ndarray, path: str) -> np.ndarray:
        if path.endswith("_labelTrainIds.png"):
            return raw.astype(np.uint8)
        if raw.max() > MAX_LABEL_ID:
            raise DataError(path, f"labelId {int(raw.max())} is not a Cityscapes id (0..33)")
        return LABEL_ID_TO_TRAIN_ID[raw]
