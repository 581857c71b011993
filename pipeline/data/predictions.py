"""A model's labels for the images of some shards: the one loop that in-training validation
(pipeline/training/loop.py ``validate``), the evaluate stage (pipeline/evaluation/evaluate.py)
and the prediction pictures (``prediction_rows``: the overlays a training run logs and those
``danet evaluate`` draws) run.

Every image takes one path: decoded from its shard (pipeline/data/loader.py ``read_shard``), its
uint8 pixels moved to the device and scaled to [0, 1] there (danet/inference.py ``to_input``),
normalised by the model itself (danet/model.py ``Segmenter``: the mean and std it was trained
with; an ONNX file holds them too), then ``infer``\\ red under a protocol (the whole image by
default, as training validates). Labels are compared on the device: nothing is read back per
image but the overlays a caller asks for.

``ShardImages`` gives each global worker (rank x DataLoader worker) whole shards: every image is
read and decoded exactly once, by exactly one worker.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from danet.inference import Protocol, infer, to_input
from danet.metrics import ConfusionMatrix
from pipeline.data.loader import read_shard
from pipeline.data.manifest import ShardRef
from pipeline.devices import autocast
from pipeline.errors import DataError

Row = tuple[np.ndarray, np.ndarray, np.ndarray]  # image (H, W, 3), truth, prediction (H, W)
WHOLE = Protocol()  # the whole image in one pass: in-training validation


@dataclass(frozen=True)
class Prediction:
    """One image of a shard, its truth and a model's labels."""

    shard: str  # the shard's URL
    key: str
    image: torch.Tensor  # (H, W, 3) uint8 RGB, on the CPU
    label: torch.Tensor  # (H, W) uint8 train ids (255: ignore), on the device
    predicted: torch.Tensor  # (H, W) int64 class ids, on the device

    def row(self) -> Row:
        """(image, truth, prediction) as arrays, a picture's row (reads the device)."""
        predicted = self.predicted.to(torch.uint8).cpu().numpy()
        return self.image.numpy(), self.label.cpu().numpy(), predicted


@dataclass
class ShardImages(IterableDataset):
    """``(shard URL, key, image (H, W, 3) uint8, label (H, W) uint8)`` of the whole,
    unaugmented images of rank ``rank``'s share of ``shards``, each exactly once, in shard order
    within a worker."""

    shards: Sequence[ShardRef]
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        super().__init__()

    def my_shards(self) -> Sequence[ShardRef]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self.shards[self.rank * workers + worker :: self.world_size * workers]

    def __iter__(self) -> Iterator[tuple[str, str, np.ndarray, np.ndarray]]:
        for ref in self.my_shards():
            for key, image, label in read_shard(ref):
                yield ref.url, key, image, label


@torch.no_grad()
def predictions(
    module: nn.Module,
    shards: Sequence[ShardRef],
    device: torch.device | str,
    protocol: Protocol = WHOLE,
    *,
    precision: str = "fp32",
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Prediction]:
    """``module``'s labels for every image of rank ``rank``'s share of ``shards`` (all of them
    with the defaults), read by ``workers`` DataLoader processes (0: by this one, in order).

    ``module`` maps RGB in [0, 1] to logits (a ``Segmenter``, an ONNX session's module); it is
    moved to ``device`` and put in eval mode. ``precision``: pipeline/devices.py ``autocast``.
    """
    device = torch.device(device)
    module = module.to(device).eval()
    images = DataLoader(ShardImages(shards, rank, world_size), batch_size=None, num_workers=workers)
    for shard, key, image, label in images:
        with autocast(device, precision):
            scores = infer(module, to_input(image, device), protocol)  # (1, K, H, W)
        predicted = scores.argmax(1)[0]  # (H, W)
        yield Prediction(shard, key, image, label.to(device, non_blocking=True), predicted)


def confusion(
    images: Iterable[Prediction],
    num_classes: int,
    device: torch.device | str,
    overlays: int = 0,
) -> tuple[ConfusionMatrix, list[Row]]:
    """The confusion matrix of ``images``' predictions (on ``device``, not reduced across
    workers) and the rows of the first ``overlays``. A label that does not fit its image or
    holds an unknown class is a ``DataError`` naming the sample."""
    cm = ConfusionMatrix(num_classes, device=device)
    rows: list[Row] = []
    for p in images:
        try:
            cm.update(p.predicted, p.label)
        except ValueError as err:
            raise DataError(p.shard, f"sample {p.key}: {err}") from None
        if len(rows) < overlays:
            rows.append(p.row())
    return cm, rows


def prediction_rows(
    module: nn.Module,
    shards: Sequence[ShardRef],
    count: int,
    device: torch.device | str = "cpu",
    protocol: Protocol = WHOLE,
) -> list[Row]:
    """(image, truth, prediction) of the first ``count`` images of ``shards``."""
    first = itertools.islice(predictions(module, shards, device, protocol), count)
    return [p.row() for p in first]
