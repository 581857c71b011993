"""PASCAL Context (59 classes): VOC2010 JPEGImages/ + SegmentationClassContext/ PNG masks.

The masks are the commonly used conversion (mmsegmentation's pascal_context.py, from the Detail
API): 0 = background/other, 1..59 the classes; 0 is ignored ("reduce zero label").
Split lists: ImageSets/SegmentationContext/{train,val}.txt.
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
    bitwise_palette,
    non_empty,
    reduce_zero_label,
    require_dir,
)
from pipeline.data.readers.voc import read_split_list

CONTEXT_CLASSES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow",
    "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground",
    "horse", "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform",
    "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa",
    "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood",
)  # fmt: skip


@dataclass
class PascalContextReader(Reader):
    def __post_init__(self) -> None:
        self.info = DatasetInfo(
            "pascal_context", CONTEXT_CLASSES, bitwise_palette(60)[1:], "0 = ignore, v -> v - 1"
        )

    def items(self, split: str) -> list[Item]:
        root = require_dir(Path(self.root), "VOC2010")
        images = require_dir(root / "JPEGImages", "PASCAL Context JPEGImages")
        labels = require_dir(root / "SegmentationClassContext", "SegmentationClassContext")
        ids = read_split_list(root / "ImageSets" / "SegmentationContext" / f"{split}.txt")
        items = [
            Item(
                n,
                str(images / f"{n}.jpg"),
                str(labels / f"{n}.png") if (labels / f"{n}.png").exists() else None,
            )
            for n in sorted(set(ids))
        ]
        return non_empty(items, root, split)

    def convert_label(self, raw: np.ndarray, path: str) -> np.ndarray:
        if raw.max() > 59 and raw.max() != 255:
            raise DataError(path, f"label value {int(raw.max())} is outside 0..59")
        return reduce_zero_label(raw)
