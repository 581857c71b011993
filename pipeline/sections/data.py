"""The data sections: the synthetic dataset, sharding, the loader and its augmentation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.schema import MAX_CROP, MAX_SCALE, MAX_SEED, MAX_SIDE, Section, param, require


@dataclass(frozen=True)
class SyntheticParams(Section):
    """The embedded synthetic dataset (pipeline/data/readers/synthetic.py)."""

    NAME = "synthetic"
    num_samples: dict[str, int] = param({"train": 240, "val": 60}, ge=1, le=1_000_000, name=True)
    width: int = param(160, ge=32, le=MAX_SIDE)
    height: int = param(120, ge=32, le=MAX_SIDE)
    seed: int = param(0, ge=0, le=MAX_SEED)
    out: str = ""  # danet synthetic: the scenes as a folder dataset of PNGs (to predict)
    splits: tuple[str, ...] = param(("val",), name=True)  # folders under out: plain names
    count: int = param(0, ge=0)  # the first N scenes of each split; 0 = all

    GENERATOR = ("num_samples", "width", "height", "seed")  # what the scenes are

    def check(self) -> None:
        require(bool(self.num_samples), "synthetic.num_samples must name at least one split")

    def generator(self) -> dict[str, Any]:
        """The options of the scene generator (pipeline/data/readers/synthetic.py)."""
        return {k: getattr(self, k) for k in self.GENERATOR}


@dataclass(frozen=True)
class ShardParams(Section):
    """Raw dataset -> WebDataset shards (pipeline/data/shard.py)."""

    NAME = "shard"
    dataset: str = "synthetic"
    root: str = ""
    out: str = "data/shards"
    splits: tuple[str, ...] = param(("train", "val"), name=True)  # {split}-*.tar, plain names
    max_count: int = param(100, ge=1, le=1_000_000)
    max_size_mb: float = param(256.0, gt=0, le=1_000_000)  # up to 1 TB a shard
    image_format: str = param("original", choices=("original", "jpg"))
    jpeg_quality: int = param(95, ge=1, le=100)
    workers: int = param(2, ge=1, le=1024)
    on_error: str = param("fail", choices=("fail", "skip"))

    def check(self) -> None:
        require(bool(self.splits), "shard.splits must name at least one split")


@dataclass(frozen=True)
class DataParams(Section):
    """Loader and training augmentation (pipeline/data/augment.py, pipeline/data/loader.py)."""

    NAME = "data"
    shards: str = "data/shards"
    train_split: str = param("train", name=True)
    val_split: str = param("val", name=True)
    crop_size: int = param(96, ge=16, le=MAX_CROP)
    scale_mode: str = param("long_side", choices=("short_side", "ratio", "long_side"))
    base_size: int = param(0, ge=0, le=MAX_SIDE)  # short_side / long_side: 0 = the image's own side
    scale: tuple[int, ...] = param((), ge=1, le=MAX_SIDE)  # ratio: mmseg's (W, H) scale
    scale_min: float = param(0.75, gt=0, le=MAX_SCALE)
    scale_max: float = param(1.5, gt=0, le=MAX_SCALE)
    cat_max_ratio: float = param(1.0, gt=0, le=1)
    flip: bool = True
    photometric: bool = False
    normalization: str = param("auto", choices=("auto", "imagenet", "dataset"))
    shuffle_buffer: int = param(64, ge=1, le=1_000_000)
    loader_workers: int = param(0, ge=0, le=1024)
    gpu_decode: bool = True  # on CUDA: JPEGs decoded and augmented on the GPU

    def check(self) -> None:
        require(
            self.scale_min <= self.scale_max,
            f"data.scale_min/scale_max must satisfy min <= max, got {self.scale_min}, {self.scale_max}",
        )
        require(
            self.scale_mode != "ratio" or len(self.scale) == 2,
            f"data.scale must be [W, H] with data.scale_mode ratio, got {list(self.scale)}",
        )
