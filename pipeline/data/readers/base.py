"""What every dataset reader provides: the class table and a list of (key, image, label) items.

A reader lists its items cheaply (paths only); ``read`` loads one item and returns the image as
its original encoded bytes and the label as a uint8 array of train ids with 255 = ignore. Readers
are plain picklable objects so that sharding can fan ``read`` out over processes.

A split none of whose items has a label (Cityscapes ``test``, a VOC ``test`` list) is *images
only*: ``read(item, images_only=True)`` checks and returns the image with no label, and the
shards say so (pipeline/data/shard.py). A split where only some images lack a label is an error
for each of those, as before: half-labelled data is a mistake, not a test set.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from pipeline.errors import DataError
from pipeline.images import (
    TooLarge,
    Unreadable,
    decode_label,
    probe,
    read_file,
    require_regular,
)

IGNORE_INDEX = 255
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Item:
    """One sample to read: a key unique in its split, and where its data comes from."""

    key: str
    image: str  # a file path, or a description for generated data
    label: str | None


@dataclass(frozen=True)
class Sample:
    """One loaded sample: encoded image bytes, label train ids (H, W) uint8 (None: images only)."""

    key: str
    image_bytes: bytes
    image_format: str  # "png" or "jpg"
    label: np.ndarray | None
    source: str

    @property
    def train_ids(self) -> np.ndarray:
        """The label of a labelled sample (asking an images-only one is a bug)."""
        if self.label is None:
            raise ValueError(f"sample {self.key} has no label: it was read images only")
        return self.label


@dataclass(frozen=True)
class DatasetInfo:
    """The class table of a dataset (train ids 0..K-1; ``IGNORE_INDEX`` is not a class)."""

    name: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_rule: str = "255 = ignore"

    def __post_init__(self) -> None:
        if len(self.classes) != len(self.palette):
            raise ValueError(
                f"{self.name}: {len(self.classes)} classes but {len(self.palette)} colours"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class Reader(ABC):
    """A dataset in its published layout under ``root``."""

    root: Path
    info: DatasetInfo = field(init=False)
    # splits whose published label files are placeholders, never read (Cityscapes' test)
    UNLABELLED_SPLITS: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def items(self, split: str) -> list[Item]:
        """All items of a split, sorted by key. Raises DataError for a missing or empty root."""

    def read(self, item: Item, images_only: bool = False) -> Sample:
        """Load and validate one item (only its image with ``images_only``)."""
        image_bytes = read_file(item.image)
        fmt, size = probe(image_bytes, item.image)
        if images_only:
            return Sample(item.key, image_bytes, fmt, None, item.image)
        if item.label is None:
            raise DataError(item.image, "image has no label file")
        require_regular(item.label)
        raw = self.load_label(item.label)
        check_raw_values(raw, item.label)
        label = self.convert_label(raw, item.label)
        if label.shape != (size[1], size[0]):
            raise DataError(
                item.label,
                f"label is {label.shape[1]}x{label.shape[0]} but its image is {size[0]}x{size[1]}"
                + (  # the image's EXIF orientation turns it (pipeline/images.py): shown upright
                    " upright (its EXIF orientation rotates it; the label fits the stored pixels)"
                    if label.shape == size
                    else ""
                ),
            )
        check_label_values(label, self.info.num_classes, item.label)
        return Sample(item.key, image_bytes, fmt, label, item.image)

    def load_label(self, path: str) -> np.ndarray:
        """The label file's raw values (a single-channel PNG by default)."""
        return load_label_array(path)

    def convert_label(self, raw: np.ndarray, path: str) -> np.ndarray:
        """Raw label values -> train ids (255 = ignore). Identity by default."""
        return raw.astype(np.uint8)


def images_only(items: Sequence[Item]) -> bool:
    """A split is images only when none of its items has a label."""
    return not any(item.label for item in items)


def check_raw_values(raw: np.ndarray, path: str) -> None:
    """Stored label values are class ids 0..255 whatever the file's bit depth: a 16-bit value
    would wrap around to another class when converted to uint8."""
    if raw.size and (raw.min() < 0 or raw.max() > IGNORE_INDEX):
        bad = int(raw.max() if raw.max() > IGNORE_INDEX else raw.min())
        raise DataError(path, f"label value {bad} is outside 0..{IGNORE_INDEX}: not a class id")


def load_label_array(path: str) -> np.ndarray:
    """A label PNG as its raw stored values: palette PNGs give indices, never colours."""
    try:
        return decode_label(read_file(path))
    except TooLarge as err:
        raise DataError(path, f"too large to decode safely ({err})") from None
    except Unreadable as err:
        raise DataError(path, f"unreadable or truncated label ({err.reason})") from None
    except ValueError as err:  # a colour label (Unsupported), or no parser reads it
        raise DataError(path, str(err)) from None


def check_label_values(label: np.ndarray, num_classes: int, path: str) -> None:
    values = np.unique(label)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
    if bad.size:
        raise DataError(
            path,
            f"label values {bad.tolist()[:5]} are outside the {num_classes} classes "
            f"(0..{num_classes - 1}) and not ignore ({IGNORE_INDEX})",
        )


def lookup_table(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    """A uint8 table raw value -> train id, 255 for every value not in ``mapping``."""
    table = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    for raw, train_id in mapping.items():
        table[raw] = train_id
    return table


def reduce_zero_label(raw: np.ndarray) -> np.ndarray:
    """0 -> 255 (ignore), v -> v - 1, 255 stays: ADE20K's and PASCAL Context's 'other = 0'."""
    out = raw.astype(np.int32) - 1
    out[(raw == 0) | (raw == IGNORE_INDEX)] = IGNORE_INDEX
    return out.astype(np.uint8)


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(path, f"{what} directory does not exist")
    return path


def pair_by_stem(
    images: Sequence[Path],
    label_for: Callable[[Path], Path],
    key_for: Callable[[Path], str] = lambda p: p.stem,
) -> list[Item]:
    """Items for image files, each with the label path the dataset's rule gives (may not exist)."""
    items = []
    for image in images:
        label = label_for(image)
        items.append(
            Item(
                key=safe_key(key_for(image)),
                image=str(image),
                label=str(label) if label.exists() else None,
            )
        )
    return sorted(items, key=lambda it: it.key)


def list_images(directory: Path, recursive: bool = False) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    # not only regular files: a FIFO or device named like an image is listed, then refused
    # unopened when read (``pipeline.images.read_file``), never skipped in silence
    return sorted(
        p
        for p in directory.glob(pattern)
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir()
    )


def safe_key(key: str) -> str:
    """WebDataset splits file names at the first dot: keys must not contain one."""
    return key.replace(".", "_").replace("/", "_")


def check_unique_keys(items: Sequence[Item], split: str) -> None:
    """No two items of a split share a key: in a shard, webdataset would read their files as
    one sample while the manifest counted two. Keys are file stems made safe (``safe_key``), so
    ``v.1.png`` and ``v_1.png``, or ``a.png`` and ``a.jpg``, collide: refused, naming both."""
    first: dict[str, str] = {}
    for item in items:
        if (other := first.setdefault(item.key, item.image)) != item.image:
            raise DataError(
                item.image,
                f"its sample key {item.key!r} is also {other}'s in split {split!r} (keys are "
                "file stems, '.' and '/' read as '_'): rename one of them",
            )


def non_empty(items: list[Item], where: Path, split: str) -> list[Item]:
    if not items:
        raise DataError(where, f"no images found for split {split!r}")
    return items


def bitwise_palette(n: int) -> tuple[tuple[int, int, int], ...]:
    """The PASCAL VOC colour map (bit-interleaved), used where a dataset has no official colours."""
    colours = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours.append((r, g, b))
    return tuple(colours)
