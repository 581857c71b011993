"""Shards -> batches, split across Ray workers (rank / world size) and DataLoader workers.

Training streams are infinite in principle and cut to an explicit epoch length: every rank yields
exactly ``batches_per_epoch`` batches whatever the shard sizes, so DDP never waits on a rank that
ran out of data. Each global worker ``g = rank * loader_workers + worker`` first reads its share
``perm[g::G]`` of the epoch's shard permutation, then resamples shards at random; samples pass a
shuffle buffer. The permutation depends on (seed, epoch), everything else on
(seed, epoch, rank, worker): a resumed run sees exactly the data the uninterrupted one saw.

Evaluation streams read every shard in order and keep sample ``i`` on global worker
``i % G``: whole images, each exactly once across all workers.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.transforms import AugmentParams, eval_transform, train_transform

IMAGE_SUFFIXES = ("jpg", "png", "jpeg")


def decode_image(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"))


def decode_label(data: bytes) -> np.ndarray:
    """The stored train ids, untouched: no palette or colour conversion (unlike wds's 'l8')."""
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im)


def read_shard(url: str) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(key, image, label) of each sample of one shard, in order. ``url`` may be any wds URL."""
    for sample in wds.tarfile_to_samples()(iter([{"url": url}])):
        image = next((sample[s] for s in IMAGE_SUFFIXES if s in sample), None)
        if image is None or "seg.png" not in sample:
            raise ValueError(f"{url}: sample {sample['__key__']} lacks an image or seg.png")
        yield sample["__key__"], decode_image(image), decode_label(sample["seg.png"])


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


@dataclass
class TrainStream(IterableDataset):
    """Augmented training batches; set ``epoch`` before each pass (``set_epoch``)."""

    urls: Sequence[str]
    batch_size: int
    batches_per_epoch: int
    augment: AugmentParams
    mean: Sequence[float]
    std: Sequence[float]
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle_buffer: int = 64
    epoch: int = 0

    def __post_init__(self) -> None:
        super().__init__()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard_order(self, worker: int, num_workers: int) -> Iterator[str]:
        """This worker's share of the epoch's permutation, then shards resampled at random."""
        g = self.rank * num_workers + worker
        n_global = self.world_size * num_workers
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.urls))
        yield from (self.urls[i] for i in perm[g::n_global])
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, 1])
        while True:
            yield self.urls[int(rng.integers(len(self.urls)))]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker, num_workers = _worker()
        n_batches = self.batches_per_epoch // num_workers + (
            worker < self.batches_per_epoch % num_workers
        )
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        samples = (s for url in self.shard_order(worker, num_workers) for s in read_shard(url))
        buffer: list[tuple[str, np.ndarray, np.ndarray]] = []
        images, labels = [], []
        produced = 0
        while produced < n_batches:
            while len(buffer) < max(self.shuffle_buffer, 1):
                buffer.append(next(samples))
            _, image, label = buffer.pop(int(rng.integers(len(buffer))))
            x, y = train_transform(image, label, self.augment, self.mean, self.std, rng)
            images.append(x)
            labels.append(y)
            if len(images) == self.batch_size:
                yield torch.stack(images), torch.stack(labels)
                images, labels = [], []
                produced += 1


@dataclass
class EvalStream(IterableDataset):
    """Whole, unaugmented images ``(image (3, H, W), label (H, W), key)``, each exactly once."""

    urls: Sequence[str]
    mean: Sequence[float]
    std: Sequence[float]
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        super().__init__()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, str]]:
        worker, num_workers = _worker()
        g, n_global = self.rank * num_workers + worker, self.world_size * num_workers
        index = 0
        for url in self.urls:
            for key, image, label in read_shard(url):
                if index % n_global == g:
                    x, y = eval_transform(image, label, self.mean, self.std)
                    yield x, y, key
                index += 1


def train_loader(stream: TrainStream, workers: int) -> DataLoader:
    """Batches come ready from the stream; workers restart each epoch to pick up ``set_epoch``."""
    return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=False)


def eval_loader(stream: EvalStream, workers: int) -> DataLoader:
    return DataLoader(stream, batch_size=1, num_workers=workers)
