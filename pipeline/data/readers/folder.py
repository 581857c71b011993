"""A generic folder dataset: images/{split}/ + masks/{split}/*.png + classes.txt.

``classes.txt`` has one class a line, ``name`` or ``name R G B``; a mask pixel is the class's line
number (0-based), 255 = ignore. Images and masks pair by file stem. A split with no
masks/{split}/ folder is images only (a test set to predict).
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
    list_images,
    non_empty,
    pair_by_stem,
    require_dir,
)


def read_class_file(path: Path) -> DatasetInfo:
    if not path.is_file():
        raise DataError(path, "class list file does not exist")
    names, colours = [], []
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    default = bitwise_palette(len(lines))
    for i, line in enumerate(lines):
        parts = line.split()
        if len(parts) >= 4 and all(p.isdigit() for p in parts[-3:]):
            names.append(" ".join(parts[:-3]))
            colours.append(tuple(int(p) for p in parts[-3:]))
        else:
            names.append(line)
            colours.append(default[i])
    if not names:
        raise DataError(path, "class list is empty")
    if any(not 0 <= v <= 255 for c in colours for v in c):
        raise DataError(path, "colours must be 0..255")
    return DatasetInfo(path.parent.name, tuple(names), tuple(colours))  # type: ignore[arg-type]


@dataclass
class FolderReader(Reader):
    def __post_init__(self) -> None:
        self.info = read_class_file(Path(self.root) / "classes.txt")

    def items(self, split: str) -> list[Item]:
        images = require_dir(Path(self.root) / "images" / split, f"images/{split}")
        masks = Path(self.root) / "masks" / split  # missing: the split is images only
        items = pair_by_stem(list_images(images), lambda p: masks / f"{p.stem}.png")
        return non_empty(items, images, split)
