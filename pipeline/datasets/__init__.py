"""Dataset readers, one per published layout, looked up by name with ``make_reader``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.datasets.ade20k import ADE20KReader
from pipeline.datasets.base import DataError, DatasetInfo, Item, Reader, Sample
from pipeline.datasets.camvid import CamVidReader
from pipeline.datasets.cityscapes import CityscapesReader
from pipeline.datasets.cocostuff import CocoStuffReader
from pipeline.datasets.context import PascalContextReader
from pipeline.datasets.folder import FolderReader
from pipeline.datasets.synthetic import SyntheticReader
from pipeline.datasets.voc import VOCReader

READERS: dict[str, type[Reader]] = {
    "cityscapes": CityscapesReader,
    "voc": VOCReader,
    "pascal_context": PascalContextReader,
    "cocostuff": CocoStuffReader,
    "ade20k": ADE20KReader,
    "camvid": CamVidReader,
    "folder": FolderReader,
    "synthetic": SyntheticReader,
}


def make_reader(name: str, root: str | Path = "", **options: Any) -> Reader:
    """The reader for a dataset name; ``options`` go to the synthetic generator only."""
    try:
        cls = READERS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(READERS)}") from None
    if cls is SyntheticReader:
        return SyntheticReader(Path(root or "."), **options)
    if not root:
        raise DataError("shard.root", f"dataset {name!r} needs a root directory")
    if not Path(root).is_dir():
        raise DataError(root, "dataset root does not exist")
    return cls(Path(root))


__all__ = ["READERS", "DataError", "DatasetInfo", "Item", "Reader", "Sample", "make_reader"]
