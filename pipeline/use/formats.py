"""What ``danet predict`` writes per image: pictures, or the files a benchmark server reads.

- ``masks``: ``<stem>_mask.png`` (the dataset's palette), ``<stem>_overlay.png`` and
  ``<stem>_labels.png`` (single-channel train ids, for programs).
- ``cityscapes``: ``<frame>_leftImg8bit.png``, a single-channel PNG of the official labelIds (the
  19 train ids mapped back with cityscapesscripts' table: road 7, sidewalk 8, ..., bicycle 33),
  at the image's full size. The test server (and cityscapesscripts'
  evalPixelLevelSemanticLabeling) finds a frame's prediction by the pattern
  ``<city>_<seq>_<frame>*.png`` anywhere in the submitted folder.
- ``voc``: ``<id>.png``, a palette PNG of class indices 0..20 with VOC's colour map, as the PASCAL
  VOC server takes them (results/VOC2012/Segmentation/comp6_test_cls/ in the archive).

A server format needs a model of that dataset's classes, checked before any image is read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.config import ConfigError
from pipeline.data.readers.base import bitwise_palette
from pipeline.data.readers.cityscapes import CITYSCAPES_CLASSES, TRAIN_ID_TO_LABEL_ID
from pipeline.data.readers.voc import VOC_CLASSES
from pipeline.pictures import colorize, overlay

CITYSCAPES_SUFFIX = "_leftImg8bit"
VOC_PALETTE = [v for colour in bitwise_palette(256) for v in colour]

Files = dict[str, Image.Image]  # file name -> picture


@dataclass(frozen=True)
class OutputFormat:
    """How one prediction becomes files; ``classes``: the model classes it requires (or None);
    ``names``: the patterns of every file name it writes (an output folder holding others is
    not predict's, ``pipeline.outputs.check_own``)."""

    name: str
    classes: tuple[str, ...] | None
    files: Callable[[str, np.ndarray, np.ndarray, Sequence[Sequence[int]]], Files]
    names: tuple[str, ...]

    def file_names(self, stem: str) -> tuple[str, ...]:
        """The names of the files one image of ``stem`` gets (what ``files`` would write)."""
        dot = np.zeros((1, 1), dtype=np.uint8)
        return tuple(self.files(stem, np.zeros((1, 1, 3), np.uint8), dot, [(0, 0, 0)]))

    def check(self, model_classes: Sequence[str], ref: str) -> None:
        if self.classes is not None and tuple(model_classes) != self.classes:
            shown = ", ".join(model_classes[:3])
            raise ConfigError(
                f"predict.format {self.name}: {ref} predicts {len(model_classes)} classes "
                f"({shown}, ...), not the {len(self.classes)} of {self.name} "
                f"({', '.join(self.classes[:3])}, ...) that its server scores"
            )


def masks_files(
    stem: str, image: np.ndarray, pred: np.ndarray, palette: Sequence[Sequence[int]]
) -> Files:
    return {
        f"{stem}_mask.png": Image.fromarray(colorize(pred, palette)),
        f"{stem}_overlay.png": Image.fromarray(overlay(image, pred, palette)),
        f"{stem}_labels.png": Image.fromarray(pred),
    }


def cityscapes_name(stem: str) -> str:
    """A frame's file name: ``berlin_000000_000019`` or ``berlin_000000_000019_leftImg8bit``
    -> ``berlin_000000_000019_leftImg8bit.png``."""
    frame = stem.removesuffix(CITYSCAPES_SUFFIX)
    return f"{frame}{CITYSCAPES_SUFFIX}.png"


def to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """(H, W) Cityscapes train ids -> official labelIds (ignore 255 -> 0, unlabeled)."""
    return TRAIN_ID_TO_LABEL_ID[train_ids]


def cityscapes_files(
    stem: str, image: np.ndarray, pred: np.ndarray, palette: Sequence[Sequence[int]]
) -> Files:
    return {cityscapes_name(stem): Image.fromarray(to_label_ids(pred), mode="L")}


def voc_picture(pred: np.ndarray) -> Image.Image:
    """(H, W) class indices -> a palette PNG with VOC's colour map."""
    h, w = pred.shape
    picture = Image.frombytes("P", (w, h), np.ascontiguousarray(pred, dtype=np.uint8).tobytes())
    picture.putpalette(VOC_PALETTE)
    return picture


def voc_files(
    stem: str, image: np.ndarray, pred: np.ndarray, palette: Sequence[Sequence[int]]
) -> Files:
    return {f"{stem}.png": voc_picture(pred)}


FORMATS = {
    "masks": OutputFormat(
        "masks", None, masks_files, ("*_mask.png", "*_overlay.png", "*_labels.png")
    ),
    "cityscapes": OutputFormat(
        "cityscapes",
        tuple(name for name, _, _ in CITYSCAPES_CLASSES),
        cityscapes_files,
        (f"*{CITYSCAPES_SUFFIX}.png",),
    ),
    "voc": OutputFormat("voc", VOC_CLASSES, voc_files, ("*.png",)),
}
