"""ADE20K (SceneParsing, ADEChallengeData2016): images/ + annotations/{training,validation}/.

150 classes; annotation 0 = "other" is ignored and v -> v - 1 ("reduce zero label").
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
    non_empty,
    pair_by_stem,
    reduce_zero_label,
    require_dir,
)

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van",
    "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light",
    "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower",
    "radiator", "glass", "clock", "flag",
)  # fmt: skip


@dataclass
class ADE20KReader(Reader):
    def __post_init__(self) -> None:
        self.info = DatasetInfo(
            "ade20k", ADE20K_CLASSES, bitwise_palette(151)[1:], "0 = ignore, v -> v - 1"
        )

    def items(self, split: str) -> list[Item]:
        root = Path(self.root)
        images = require_dir(root / "images" / split, f"ADE20K images/{split}")
        labels = require_dir(root / "annotations" / split, f"ADE20K annotations/{split}")
        items = pair_by_stem(list_images(images), lambda p: labels / f"{p.stem}.png")
        return non_empty(items, images, split)

    def convert_label(self, raw: np.ndarray, path: str) -> np.ndarray:
        if raw.max() > 150:
            raise DataError(path, f"label value {int(raw.max())} is outside 0..150")
        return reduce_zero_label(raw)
