"""Dataset readers, one per published layout, looked up by name with ``make_reader``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.data.readers.ade20k import ADE20KReader
from pipeline.data.readers.base import DatasetInfo, Item, Reader, Sample
from pipeline.data.readers.camvid import CamVidReader
from pipeline.data.readers.cityscapes import CityscapesReader
from pipeline.data.readers.cocostuff import CocoStuff10kReader, CocoStuffReader
from pipeline.data.readers.context import PascalContextReader
from pipeline.data.readers.folder import FolderReader
from pipeline.data.readers.synthetic import SyntheticReader
from pipeline.data.readers.voc import VOCReader
from pipeline.errors import ConfigError, DataError

if TYPE_CHECKING:  # params arrive as values: a stage does not run the config code
    from pipeline.sections import ShardParams, SyntheticParams

READERS: dict[str, type[Reader]] = {
    "cityscapes": CityscapesReader,
    "voc": VOCReader,
    "pascal_context": PascalContextReader,
    "cocostuff": CocoStuffReader,
    "cocostuff10k": CocoStuff10kReader,
    "ade20k": ADE20KReader,
    "camvid": CamVidReader,
    "folder": FolderReader,
    "synthetic": SyntheticReader,
}


def reader_for(shard: ShardParams, synthetic: SyntheticParams) -> Reader:
    """The reader of ``shard.dataset`` at ``shard.root`` (the synthetic scenes: as ``synthetic``
    says)."""
    options = synthetic.generator() if shard.dataset == "synthetic" else {}
    return make_reader(shard.dataset, shard.root, **options)


def make_reader(name: str, root: str | Path = "", **options: Any) -> Reader:
    """The reader for a dataset name; ``options`` go to the synthetic generator only."""
    if name not in READERS:
        raise ConfigError(f"shard.dataset {name!r} is unknown; known: {', '.join(READERS)}")
    cls = READERS[name]
    if cls is SyntheticReader:
        return SyntheticReader(Path(root or "."), **options)
    if not root:
        raise ConfigError(f"shard.root: dataset {name!r} needs a root directory")
    if not Path(root).is_dir():
        raise DataError(root, "dataset root does not exist")
    return cls(Path(root))


__all__ = ["READERS", "DatasetInfo", "Item", "Reader", "Sample", "make_reader", "reader_for"]
