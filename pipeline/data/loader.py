"""Shards -> batches, split across Ray workers (rank / world size) and DataLoader workers.

Training streams are cut to an explicit epoch length: every rank yields exactly
``batches_per_epoch`` batches whatever the shard sizes, so DDP never waits on a rank that ran out
of data. Each global worker ``g = rank * loader_workers + worker`` first reads its share
``perm[g::G]`` of the epoch's shard permutation, then resamples shards at random. Samples pass
a shuffle buffer *before* they are decoded (the buffer holds compressed bytes), then are decoded
and augmented (pipeline/data/augment.py). The permutation depends on (seed, epoch), everything
else on (seed, epoch, rank, worker): a resumed run sees exactly the data the uninterrupted one saw.
The loader's worker processes persist across epochs; the epoch reaches them through shared
memory (``set_epoch``), not a rebuild.

With ``gpu_decode`` the workers only read bytes, decode the small label PNGs and draw each
sample's augmentation; JPEG images are decoded and augmented on the GPU in batches
(pipeline/data/gpu.py) with the same draws.

Whole images for validation and evaluation: pipeline/data/predictions.py (``ShardImages``).

A shard's sha256 is checked against the manifest's as it is read to its end: a replaced or
corrupt shard stops the run with a ``DataError`` naming it.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

if TYPE_CHECKING:
    from pipeline.sections import DataParams

from pipeline import images
from pipeline.data.augment import Draw, apply_image, apply_label, draw, normalize
from pipeline.data.manifest import ShardRef
from pipeline.data.storage import open_binary
from pipeline.errors import DataError

IMAGE_SUFFIXES = ("jpg", "png", "jpeg")


@dataclass(frozen=True)
class RawSample:
    key: str
    image: bytes
    image_format: str  # jpg or png
    label: bytes  # single-channel PNG of train ids; b"" in an images-only shard
    shard: str = ""  # the shard's URL: where a bad sample is reported

    @property
    def where(self) -> str:
        return f"{self.shard}:{self.key}" if self.shard else self.key


class _Hashing(io.RawIOBase):
    """A read-only stream that hashes what passes through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.digest = raw, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.raw.readinto(buffer)  # type: ignore[attr-defined]
        self.digest.update(memoryview(buffer)[:n])
        return n


def iter_raw(shard: ShardRef | str) -> Iterator[RawSample]:
    """The samples of one shard, in order, as bytes; the digest is checked at the end."""
    ref = ShardRef(shard) if isinstance(shard, str) else shard
    count = 0
    with open_binary(ref.url) as f:
        stream = _Hashing(f)
        try:
            with tarfile.open(fileobj=io.BufferedReader(stream), mode="r|") as tar:
                for sample in _group(tar, ref.url, ref.labelled):
                    count += 1
                    yield sample
        except (tarfile.TarError, EOFError, OSError) as err:
            raise DataError(ref.url, f"not a readable shard ({err})") from None
        while stream.read(1 << 20):  # the tar's end padding: the digest covers the whole file
            pass
    if ref.sha256 and stream.digest.hexdigest() != ref.sha256:
        raise DataError(
            ref.url,
            "shard content differs from the manifest's sha256: replaced or corrupt (re-run danet shard)",
        )
    if ref.samples >= 0 and count != ref.samples:
        raise DataError(ref.url, f"shard holds {count} samples, the manifest says {ref.samples}")


def _group(tar: tarfile.TarFile, url: str, labelled: bool = True) -> Iterator[RawSample]:
    """Consecutive tar members with one key -> one sample (WebDataset's convention)."""
    key, files = None, {}
    for member in tar:
        name = member.name.rsplit("/", 1)[-1]
        stem, _, suffix = name.partition(".")
        if stem != key and key is not None:
            yield _sample(key, files, url, labelled)
            files = {}
        key = stem
        handle = tar.extractfile(member)
        files[suffix] = handle.read() if handle else b""
    if key is not None:
        yield _sample(key, files, url, labelled)


def _sample(key: str, files: dict[str, bytes], url: str, labelled: bool) -> RawSample:
    fmt = next((s for s in IMAGE_SUFFIXES if s in files), None)
    if fmt is None or (labelled and "seg.png" not in files):
        raise DataError(url, f"sample {key} lacks an image or seg.png")
    label = files.get("seg.png", b"") if labelled else b""
    return RawSample(key, files[fmt], "jpg" if fmt == "jpeg" else fmt, label, url)


def decode_image(data: bytes, where: str = "image") -> np.ndarray:
    """A shard's image -> (H, W, 3) uint8 by the one decoder (pipeline/images.py), as stored:
    ``danet shard`` stored it upright, and nvJPEG reads no EXIF either. A truncated, oversized
    or unsupported image is a ``DataError`` naming ``where`` (shard:key)."""
    try:
        return images.decode_rgb(data, ("PNG", "JPEG"), exif=False)
    except ValueError as err:
        raise DataError(where, f"bad image ({err})") from None


def decode_label(data: bytes, where: str = "label") -> np.ndarray:
    """The stored train ids, untouched: no palette or colour conversion."""
    try:
        return images.decode_label(data)
    except ValueError as err:
        raise DataError(where, f"bad seg.png ({err})") from None


def image_size(data: bytes, where: str = "image") -> tuple[int, int]:
    """(H, W) from the image header, without decoding the pixels."""
    try:
        return images.image_size(data)
    except ValueError as err:
        raise DataError(where, f"bad image ({err})") from None


def read_shard(shard: ShardRef | str) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(key, image (H, W, 3), label (H, W)) of each sample of one labelled shard, decoded, in
    order."""
    if isinstance(shard, ShardRef) and not shard.labelled:
        raise DataError(shard.url, "shard holds images only (no labels)")
    for raw in iter_raw(shard):
        yield raw.key, decode_image(raw.image, raw.where), decode_label(raw.label, raw.where)


def read_images(shard: ShardRef) -> Iterator[tuple[str, np.ndarray]]:
    """(key, image (H, W, 3)) of each sample of one shard, labelled or not, in order."""
    for raw in iter_raw(shard):
        yield raw.key, decode_image(raw.image, raw.where)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


@dataclass
class RawBatch:
    """A training batch for the GPU path: encoded JPEGs (or decoded CPU images), draws, labels."""

    images: list[torch.Tensor]  # 1-D uint8 JPEG bytes, or (3, H, W) uint8 decoded
    draws: list[Draw]
    labels: torch.Tensor  # (B, crop, crop) int64, already augmented

    def pin_memory(self) -> RawBatch:
        return RawBatch([t.pin_memory() for t in self.images], self.draws, self.labels.pin_memory())


def _shared_int() -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64).share_memory_()


@dataclass
class TrainStream(IterableDataset):
    """Augmented training batches; ``set_epoch`` before each pass."""

    shards: Sequence[ShardRef]
    batch_size: int
    batches_per_epoch: int
    augment: DataParams  # params.yaml's data section: the augmentation reads it as it is
    mean: Sequence[float]
    std: Sequence[float]
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle_buffer: int = 64
    gpu_decode: bool = False
    epoch_tensor: torch.Tensor = field(default_factory=_shared_int)
    skip_tensor: torch.Tensor = field(default_factory=_shared_int)

    def __post_init__(self) -> None:
        super().__init__()

    @property
    def epoch(self) -> int:
        return int(self.epoch_tensor)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The next pass is ``epoch``, from its batch ``skip`` on (a resumed run). Shared memory:
        the loader's persistent worker processes see it too."""
        self.epoch_tensor.fill_(epoch)
        self.skip_tensor.fill_(skip)

    def shard_order(self, worker: int, num_workers: int) -> Iterator[ShardRef]:
        """This worker's share of the epoch's permutation, then shards resampled at random."""
        g = self.rank * num_workers + worker
        n_global = self.world_size * num_workers
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
        yield from (self.shards[i] for i in perm[g::n_global])
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, 1])
        while True:
            yield self.shards[int(rng.integers(len(self.shards)))]

    def raw_samples(
        self, rng: np.random.Generator, worker: int, num_workers: int
    ) -> Iterator[RawSample]:
        """Samples through the shuffle buffer, still encoded."""
        samples = (s for ref in self.shard_order(worker, num_workers) for s in iter_raw(ref))
        buffer: list[RawSample] = []
        while True:
            while len(buffer) < self.shuffle_buffer:
                buffer.append(next(samples))
            yield buffer.pop(int(rng.integers(len(buffer))))

    def next_sample(
        self, samples: Iterator[RawSample], rng: np.random.Generator
    ) -> tuple[RawSample, Draw, torch.Tensor]:
        """The next sample, its draw (the size from the image header) and its label."""
        raw = next(samples)
        h, w = image_size(raw.image, raw.where)
        label = torch.from_numpy(decode_label(raw.label, raw.where))
        return (
            raw,
            draw(h, w, self.augment, rng, label if self.augment.cat_max_ratio < 1 else None),
            label,
        )

    def build(
        self, raw: RawSample, d: Draw, label: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(image source or augmented image, augmented label): JPEG bytes stay encoded for the GPU."""
        crop = self.augment.crop_size
        if self.gpu_decode and raw.image_format == "jpg":
            image = torch.frombuffer(bytearray(raw.image), dtype=torch.uint8)
        else:
            image = torch.from_numpy(decode_image(raw.image, raw.where)).permute(2, 0, 1)
            if not self.gpu_decode:
                image = normalize(apply_image(image, d, crop), self.mean, self.std)
        return image, apply_label(label, d, crop)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor] | RawBatch]:
        worker, num_workers = _worker()
        n_batches = self.batches_per_epoch // num_workers + (
            worker < self.batches_per_epoch % num_workers
        )
        skip = int(self.skip_tensor)  # batch k of the epoch comes from worker k % num_workers
        skip = skip // num_workers + (worker < skip % num_workers)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        samples = self.raw_samples(rng, worker, num_workers)
        for _ in range(skip * self.batch_size):  # replay the draws of the batches already trained
            self.next_sample(samples, rng)
        for _ in range(n_batches - skip):
            drawn = [self.next_sample(samples, rng) for _ in range(self.batch_size)]
            images, labels = zip(*(self.build(*s) for s in drawn), strict=True)
            if self.gpu_decode:
                yield RawBatch(list(images), [d for _, d, _ in drawn], torch.stack(labels))
            else:
                yield torch.stack(images), torch.stack(labels)


def train_loader(stream: TrainStream, workers: int, pin_memory: bool = False) -> DataLoader:
    """Batches come ready from the stream; the worker processes persist across epochs."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
    )
