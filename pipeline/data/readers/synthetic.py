"""Synthetic street scenes with CamVid's 11 classes and palette: the pipeline's no-download dataset.

Each scene is drawn from its own seed (dataset seed, split, index), so the data is the same on any
machine: a sky gradient over a horizon; buildings with window grids; a road in perspective with
dashed lane markings towards a vanishing point; pavements on both sides; fences, trees, poles with
signs; cars on the road and pedestrians / cyclists on the pavement, sized by their distance; some
void clutter labelled 255. Then random lighting, colour cast, blur and noise. Colours of the
classes overlap (grey buildings, roads and pavements; dark cars), so a model must use texture and
layout, not a colour lookup. A split named ``test`` is images only, like a benchmark's test set.
"""

from __future__ import annotations

import dataclasses
import io
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from pipeline.data.readers.base import Item, Reader, Sample
from pipeline.data.readers.camvid import CAMVID_INFO
from pipeline.data.readers.scene import render_scene
from pipeline.errors import ConfigError
from pipeline.locations import check_name
from pipeline.outputs import atomic_dir, check_own

if TYPE_CHECKING:  # params arrive as values: a stage does not run the config code
    from pipeline.sections import SyntheticParams


def scene_seed(seed: int, split: str, index: int) -> int:
    return zlib.crc32(f"{seed}/{split}/{index}".encode())


@dataclass
class SyntheticReader(Reader):
    """Generated scenes; ``root`` is unused. Sizes per split and image size come from params."""

    root: Path = Path(".")
    num_samples: dict[str, int] = field(default_factory=lambda: {"train": 240, "val": 60})
    width: int = 160
    height: int = 120
    seed: int = 0
    UNLABELLED_SPLITS = ("test",)

    def __post_init__(self) -> None:
        self.info = dataclasses.replace(CAMVID_INFO, name="synthetic")

    def items(self, split: str) -> list[Item]:
        if split not in self.num_samples:
            raise ConfigError(
                f"synthetic.num_samples has no split {split!r}; it has {', '.join(self.num_samples)}"
            )
        return [
            Item(
                f"synthetic_{split}_{i:06d}",
                f"synthetic:seed={self.seed}:{split}:{i}",
                None if split in self.UNLABELLED_SPLITS else f"{split}:{i}",
            )
            for i in range(self.num_samples[split])
        ]

    def read(self, item: Item, images_only: bool = False) -> Sample:
        _, _, split, index = item.image.split(":")
        rgb, label = render_scene(scene_seed(self.seed, split, int(index)), self.width, self.height)
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="PNG", compress_level=6)
        return Sample(
            item.key, buffer.getvalue(), "png", None if images_only else label, item.image
        )


def export_folder(params: SyntheticParams) -> list[Path]:
    """``danet synthetic``: the scenes of ``params.splits`` as a folder dataset at ``params.out``."""
    if not params.out:
        raise ConfigError("synthetic.out: give the folder to write (--out)")
    reader = SyntheticReader(Path("."), **params.generator())
    return write_folder_dataset(reader, Path(params.out), params.splits, params.count)


def write_folder_dataset(
    reader: SyntheticReader, out: Path, splits: tuple[str, ...], count: int = 0
) -> list[Path]:
    """Scenes as a ``folder`` dataset (images/{split}/, masks/{split}/, classes.txt), e.g. images
    to try ``danet predict`` on. ``count`` > 0 keeps the first ``count`` of each split. The folder
    appears atomically; returns the image files."""
    for split in splits:
        check_name(split, "synthetic.splits")  # images/{split}/: a folder that stays in out
    check_own(out, "synthetic.out", "synthetic", ("classes.txt", "images", "masks"))
    images: list[Path] = []
    with atomic_dir(out) as tmp:
        lines = [
            f"{n} {r} {g} {b}"
            for n, (r, g, b) in zip(reader.info.classes, reader.info.palette, strict=True)
        ]
        (tmp / "classes.txt").write_text("\n".join(lines) + "\n")
        for split in splits:
            for item in reader.items(split)[: count or None]:
                sample = reader.read(item, images_only=item.label is None)  # test: no masks
                for kind in ("images", "masks") if sample.label is not None else ("images",):
                    path = tmp / kind / split / f"{item.key}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    if kind == "masks" and sample.label is not None:
                        Image.fromarray(sample.label, mode="L").save(path)
                    else:
                        path.write_bytes(sample.image_bytes)
                images.append(out / "images" / split / f"{item.key}.png")
    return images
