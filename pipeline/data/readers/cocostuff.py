"""COCO-Stuff: the 164k release and the 10k one the DANet paper reports on (171 classes).

- ``cocostuff`` (164k): images/{train2017,val2017}/*.jpg + stuffthingmaps/{split}/*.png. The
  stuffthingmaps PNGs (stuffthingmaps_trainval2017.zip) store COCO category id - 1: things 0..89
  (80 used, 11 ids unused), stuff 91..181 (91 classes), 255 unlabelled.
- ``cocostuff10k`` (cocostuff-10k-v1.1.zip, as published): images/*.jpg, annotations/*.mat
  (MATLAB files whose ``S`` holds the COCO category id, 0 = unlabelled) and
  imageLists/{train,test}.txt (9,000 and 1,000 images).

Both map the 171 used ids to contiguous train ids 0..170 (as mmsegmentation's coco_stuff.py and
its coco_stuff10k converter); unused ids and unlabelled -> 255.
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
    list_images,
    lookup_table,
    non_empty,
    pair_by_stem,
    require_dir,
    safe_key,
)
from pipeline.data.readers.voc import read_split_list

THINGS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
STUFF = (
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds",
    "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other",
    "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves",
    "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf",
    "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)  # fmt: skip
# COCO category ids 1..90 that have no class (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91), minus 1.
UNUSED_THING_VALUES = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
USED_VALUES = tuple(v for v in range(91) if v not in UNUSED_THING_VALUES) + tuple(range(91, 182))
VALUE_TO_TRAIN_ID = lookup_table({v: i for i, v in enumerate(USED_VALUES)})


@dataclass
class CocoStuffReader(Reader):
    def __post_init__(self) -> None:
        self.info = DatasetInfo(
            "cocostuff", THINGS + STUFF, bitwise_palette(171), "unused ids and 255 -> 255"
        )

    def items(self, split: str) -> list[Item]:
        root = Path(self.root)
        images = require_dir(root / "images" / split, f"COCO-Stuff images/{split}")
        labels = require_dir(root / "stuffthingmaps" / split, f"COCO-Stuff stuffthingmaps/{split}")
        items = pair_by_stem(list_images(images), lambda p: labels / f"{p.stem}.png")
        return non_empty(items, images, split)

    def convert_label(self, raw: np.ndarray, path: str) -> np.ndarray:
        if raw.max() > 181 and raw.max() != 255:
            raise DataError(path, f"label value {int(raw.max())} is not a COCO-Stuff id (0..181)")
        return VALUE_TO_TRAIN_ID[raw]


ID_TO_TRAIN_ID = lookup_table(
    {v + 1: i for i, v in enumerate(USED_VALUES)}
)  # 10k: 1-based, 0 = none


@dataclass
class CocoStuff10kReader(Reader):
    def __post_init__(self) -> None:
        self.info = DatasetInfo(
            "cocostuff10k",
            THINGS + STUFF,
            bitwise_palette(171),
            "0 (unlabelled) and unused ids -> 255",
        )

    def items(self, split: str) -> list[Item]:
        root = Path(self.root)
        images = require_dir(root / "images", "COCO-Stuff-10k images")
        labels = require_dir(root / "annotations", "COCO-Stuff-10k annotations")
        names = read_split_list(root / "imageLists" / f"{split}.txt")
        items = []
        for name in sorted(set(names)):
            label = labels / f"{name}.mat"
            items.append(
                Item(
                    safe_key(name),
                    str(images / f"{name}.jpg"),
                    str(label) if label.exists() else None,
                )
            )
        return non_empty(items, root, split)

    def load_label(self, path: str) -> np.ndarray:
        from scipy.io import loadmat

        try:
            return np.asarray(loadmat(path)["S"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(
                path, f"not a COCO-Stuff-10k annotation (.mat with S) ({err})"
            ) from None

    def convert_label(self, raw: np.ndarray, path: str) -> np.ndarray:
        if raw.min() < 0 or raw.max() > 182:
            raise DataError(path, f"label value {int(raw.max())} is not a COCO-Stuff id (0..182)")
        return ID_TO_TRAIN_ID[raw.astype(np.int64)]
