"""CamVid in the SegNet layout: {split}/ images and {split}annot/ labels, paired by file stem.

11 classes; label value 11 ("Unlabelled") is ignored (-> 255).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.readers.base import (
    IGNORE_INDEX,
    DataError,
    DatasetInfo,
    Item,
    Reader,
    list_images,
    non_empty,
    pair_by_stem,
    require_dir,
)

CAMVID_CLASSES = (
    ("Sky", (128, 128, 128)),
    ("Building", (128, 0, 0)),
    ("Pole", (192, 192, 128)),
    ("Road", (128, 64, 128)),
    ("Pavement", (60, 40, 222)),
    ("Tree", (128, 128, 0)),
    ("SignSymbol", (192, 128, 128)),
    ("Fence", (64, 64, 128)),
    ("Car", (64, 0, 128)),
    ("Pedestrian", (64, 64, 0)),
    ("Bicyclist", (0, 128, 192)),
)
CAMVID_INFO = DatasetInfo(
    "camvid",
    tuple(c[0] for c in CAMVID_CLASSES),
    tuple(c[1] for c in CAMVID_CLASSES),
    "11 (Unlabelled) = ignore",
)
UNLABELLED = 11


@dataclass
class CamVidReader(Reader):
    def __post_init__(self) -> None:
        self.info = CAMVID_INFO

    def items(self, split: str) -> list[Item]:
        images = require_dir(Path(self.root) / split, f"CamVid {split}")
        labels = require_dir(Path(self.root) / f"{split}annot", f"CamVid {split}annot")
        by_stem = {p.stem: p for p in list_images(labels)}
        items = pair_by_stem(
            list_images(images), lambda p: by_stem.get(p.stem, labels / f"{p.stem}.png")
        )
        return non_empty(items, images, split)

    def convert_label(self, raw: np.ndarray, path: str) -> np.ndarray:
        if raw.max() > UNLABELLED and raw.max() != IGNORE_INDEX:
            bad = int(raw[(raw > UNLABELLED) & (raw != IGNORE_INDEX)].max())
            raise DataError(path, f"label value {bad} is outside CamVid's 0..11")
        out = raw.astype(np.uint8)
        out[raw == UNLABELLED] = IGNORE_INDEX
        return out
