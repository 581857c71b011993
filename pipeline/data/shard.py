"""Raw dataset -> WebDataset tar shards per split, plus manifest.json.

Each sample is ``{key}.{png|jpg}`` (the image, in its original encoding, or re-encoded: to JPEG
when ``image_format`` is jpg or the source is neither PNG nor JPEG; upright and 8-bit RGB, PNG
for a PNG source, when its pixels need converting -- an EXIF rotation, 16-bit, float, palette,
alpha, CMYK: pipeline/images.py -- so the loader and nvJPEG read what every stage reads),
``{key}.seg.png`` (a single-channel PNG of train ids, 255 = ignore; never a palette PNG) and
``{key}.json`` (source and size); an images-only split (no labels: a benchmark's test set) has no
``seg.png`` and its manifest entry says ``labelled: false``. webdataset's ``ShardWriter`` writes ``{split}-%06d.tar``, closing a
shard at ``max_count`` samples or ``max_size_mb``; its tar entries get ``mtime=0`` and fixed owner
and mode, and samples keep the reader's sorted order, so the same input and params give
byte-identical shards: DVC relies on it.

The output folder appears atomically (pipeline/outputs.py): everything is written to a temporary
sibling and renamed into place at the end, the manifest last; a failed run leaves the previous
output untouched, and an output that overlaps the dataset's root is refused before any work.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from pipeline.data.manifest import MANIFEST_VERSION, Manifest, ShardInfo, Skipped, SplitInfo
from pipeline.data.readers import Item, Reader, Sample, reader_for
from pipeline.data.readers.base import check_unique_keys, images_only
from pipeline.data.storage import publish
from pipeline.errors import DataError
from pipeline.images import TooLarge, decode_rgb, needs_conversion
from pipeline.locations import check_name, is_url
from pipeline.outputs import atomic_dir, check_output, check_outside, check_own

if TYPE_CHECKING:  # params arrive as values: a stage does not run the config code
    from pipeline.sections import ShardParams, SyntheticParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Encoded:
    """One sample ready for the tar, with the statistics the manifest needs."""

    key: str
    files: dict[str, bytes]
    class_pixels: np.ndarray  # (K + 1,): per class, then ignore
    class_image_pixels: np.ndarray  # (K,): the image's pixel count for each class it contains
    rgb_sum: np.ndarray  # (3,) float64 over pixels, values in [0, 1]
    rgb_sq_sum: np.ndarray
    size: tuple[int, int]  # (width, height)


def encode_sample(
    sample: Sample, num_classes: int, image_format: str, jpeg_quality: int, root: str
) -> Encoded:
    """Sample -> tar members and stats (runs in worker processes); a sample without a label
    (images only) gets no ``seg.png`` and counts no pixel of any class."""
    pixels = _decoded(sample)
    image = Image.fromarray(pixels)
    image_bytes, fmt = sample.image_bytes, sample.image_format
    convert = needs_conversion(image_bytes)  # upright 8-bit pixels stored, never the source's
    if (image_format == "jpg" and fmt != "jpg") or fmt not in ("jpg", "png") or convert:
        buffer = io.BytesIO()
        if fmt == "png" and image_format != "jpg":  # lossless stays lossless
            image.save(buffer, format="PNG", compress_level=6)
        else:
            image.save(buffer, format="JPEG", quality=jpeg_quality)
            fmt = "jpg"
        image_bytes = buffer.getvalue()
    files = {fmt: image_bytes}
    counts = np.zeros(256, dtype=np.int64)
    if sample.label is not None:
        label_buffer = io.BytesIO()
        Image.fromarray(sample.label, mode="L").save(label_buffer, format="PNG", compress_level=6)
        files["seg.png"] = label_buffer.getvalue()
        counts = np.bincount(sample.label.ravel(), minlength=256).astype(np.int64)
    source = sample.source
    if root and source.startswith(root):  # relative: the same data elsewhere gives the same bytes
        source = os.path.relpath(source, root)
    meta = {"source": source, "width": image.width, "height": image.height}
    rgb = pixels.astype(np.float64).reshape(-1, 3) / 255.0
    return Encoded(
        key=sample.key,
        files={**files, "json": json.dumps(meta, sort_keys=True).encode()},
        class_pixels=np.append(counts[:num_classes], counts[255]),
        class_image_pixels=(counts[:num_classes] > 0) * (image.width * image.height),
        rgb_sum=rgb.sum(0),
        rgb_sq_sum=np.square(rgb).sum(0),
        size=(image.width, image.height),
    )


def _decoded(sample: Sample) -> np.ndarray:
    """The sample's image as (H, W, 3) uint8 by the one decoder (pipeline/images.py)."""
    try:
        return decode_rgb(sample.image_bytes, None)
    except TooLarge as err:
        raise DataError(sample.source, f"too large to decode safely ({err})") from None
    except ValueError as err:
        raise DataError(sample.source, f"unreadable or truncated image ({err})") from None


@dataclass(frozen=True)
class EncodeJob:
    """Picklable work unit: read + encode one item; a bad sample comes back as a value."""

    reader: Reader
    image_format: str
    jpeg_quality: int
    images_only: bool = False

    def __call__(self, item: Item) -> Encoded | DataError:
        try:
            sample = self.reader.read(item, self.images_only)
            info = self.reader.info
            root = str(self.reader.root)
            return encode_sample(
                sample, info.num_classes, self.image_format, self.jpeg_quality, root
            )
        except DataError as err:
            return err


def encoded(
    items: list[Item], job: EncodeJob, workers: int, desc: str
) -> Iterator[Encoded | DataError]:
    """``job`` over ``items`` in order, in ``workers`` processes, with a progress bar."""
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=None)
    try:
        if workers <= 1:
            results: Iterator[Encoded | DataError] = map(job, items)
        else:
            pool = ProcessPoolExecutor(workers)
            chunk = max(1, min(16, len(items) // (4 * workers)))
            results = pool.map(job, items, chunksize=chunk)
        for result in results:
            yield result
            bar.update()
    finally:
        bar.close()
        if workers > 1:
            pool.shutdown(cancel_futures=True)


@dataclass
class SplitWriter:
    """One split's shards (webdataset's ShardWriter) and the statistics of what went in."""

    directory: Path
    split: str
    max_count: int
    max_bytes: int
    num_classes: int
    labelled: bool = True
    shards: list[ShardInfo] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    sizes: set[tuple[int, int]] = field(default_factory=set)
    writer: wds.ShardWriter | None = None

    def __post_init__(self) -> None:
        self.class_pixels = np.zeros(self.num_classes + 1, dtype=np.int64)
        self.class_image_pixels = np.zeros(self.num_classes, dtype=np.int64)
        self.rgb_sum, self.rgb_sq, self.pixels = np.zeros(3), np.zeros(3), 0
        self.counts: list[int] = []

    def write(self, sample: Encoded) -> None:
        if self.writer is None:  # opened on the first sample: an all-skipped split writes nothing
            self.writer = wds.ShardWriter(
                str(self.directory / f"{self.split}-%06d.tar"),
                maxcount=self.max_count,
                maxsize=self.max_bytes,
                post=self._closed,
                verbose=0,
                user="",
                group="",
                mode=0o444,
                mtime=0,
                encoder=False,
                format=tarfile.USTAR_FORMAT,
            )
        self.writer.write({"__key__": sample.key, **sample.files})
        index = self.writer.shard - 1  # the shard this sample went into
        self.counts.extend([0] * (index + 1 - len(self.counts)))
        self.counts[index] += 1
        self.class_pixels += sample.class_pixels
        self.class_image_pixels += sample.class_image_pixels
        self.rgb_sum += sample.rgb_sum
        self.rgb_sq += sample.rgb_sq_sum
        self.pixels += sample.size[0] * sample.size[1]
        self.sizes.add(sample.size)

    def _closed(self, fname: str) -> None:
        path = Path(fname)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        samples = self.counts[len(self.shards)]
        self.shards.append(ShardInfo(path.name, samples, digest, path.stat().st_size))

    def close(self) -> SplitInfo:
        if self.writer is not None:
            self.writer.close()
        if not self.shards:
            raise DataError(self.directory, f"split {self.split!r} has no valid samples left")
        widths, heights = zip(*self.sizes, strict=True)
        return SplitInfo(
            samples=sum(s.samples for s in self.shards),
            shards=tuple(self.shards),
            class_pixels=tuple(int(v) for v in self.class_pixels[:-1]),
            class_image_pixels=tuple(int(v) for v in self.class_image_pixels),
            ignore_pixels=int(self.class_pixels[-1]),
            min_size=(min(widths), min(heights)),
            max_size=(max(widths), max(heights)),
            skipped=tuple(self.skipped),
            labelled=self.labelled,
        )


def write_split(
    items: list[Item], job: EncodeJob, writer: SplitWriter, workers: int, on_error: str
) -> SplitInfo:
    try:
        for result in encoded(items, job, workers, f"shard {writer.split}"):
            if isinstance(result, DataError):
                if on_error == "fail":
                    raise result
                writer.skipped.append(Skipped(result.path, result.problem))
                log.warning("skipped %s: %s", result.path, result.problem)
            else:
                writer.write(result)
    except BaseException:
        if writer.writer is not None:  # close the open tar: the folder is discarded anyway
            writer.writer.close()
        raise
    return writer.close()


def shard_dataset(
    reader: Reader,
    splits: Sequence[str],
    out: Path | str,
    max_count: int = 100,
    max_size_mb: float = 256.0,
    image_format: str = "original",
    jpeg_quality: int = 95,
    workers: int = 1,
    on_error: str = "fail",
) -> Manifest:
    """Write shards and manifest for ``splits`` of ``reader`` into ``out``: a folder, replaced
    atomically, or a URL prefix (s3://, gs://, ...), published with the manifest last.

    Raises:
        DataError: the first bad sample when ``on_error == "fail"``; nothing is written then.
    """
    check_output(out, "shard.out")
    check_own(out, "shard.out", "shard", ("*.tar", "manifest.json"))
    check_outside(out, {"shard.root": reader.root} if str(reader.root) != "." else {})
    for split in splits:
        check_name(split, "shard.splits")  # {split}-*.tar: a path that stays in out
    items_by_split = {split: reader.items(split) for split in splits}  # fail fast on layout errors
    for split, items in items_by_split.items():
        check_unique_keys(items, split)
    max_bytes = int(max_size_mb * 2**20)
    with staging(out) as tmp:
        writers, infos = {}, {}
        for split, items in items_by_split.items():
            unlabelled = images_only(items)
            job = EncodeJob(reader, image_format, jpeg_quality, images_only=unlabelled)
            writers[split] = SplitWriter(
                tmp,
                split,
                max_count=max_count,
                max_bytes=max_bytes,
                num_classes=reader.info.num_classes,
                labelled=not unlabelled,
            )
            infos[split] = write_split(items, job, writers[split], workers, on_error)
        manifest = build_manifest(reader, writers, infos, image_format, str(out))
        if is_url(out):
            return publish(tmp, manifest, str(out))
        (tmp / "manifest.json").write_text(manifest.to_json())
    return manifest


@contextmanager
def staging(out: Path | str) -> Iterator[Path]:
    """Where the shards are written first: the atomic sibling of a local ``out``, a local
    temporary folder for a URL."""
    if not is_url(out):
        with atomic_dir(Path(out)) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix="danet-shards-") as tmp:
        yield Path(tmp)


def build_manifest(
    reader: Reader,
    writers: dict[str, SplitWriter],
    infos: dict[str, SplitInfo],
    image_format: str,
    location: str,
) -> Manifest:
    """The manifest; mean/std come from the train split (or the first labelled one, or the
    first one)."""
    info = reader.info
    labelled = [split for split, writer in writers.items() if writer.labelled]
    norm_split = "train" if "train" in labelled else next(iter(labelled or writers))
    stats = writers[norm_split]
    mean = stats.rgb_sum / stats.pixels
    std = np.sqrt(np.maximum(stats.rgb_sq / stats.pixels - mean**2, 0.0))
    return Manifest(
        version=MANIFEST_VERSION,
        dataset=info.name,
        classes=tuple(info.classes),
        palette=tuple(info.palette),
        ignore_rule=info.ignore_rule,
        image_format=image_format,
        mean=_rgb6(mean),
        std=_rgb6(std),
        normalization_split=norm_split,
        splits=infos,
        location=location,
    )


def _rgb6(values: np.ndarray) -> tuple[float, float, float]:
    r, g, b = (round(float(v), 6) for v in values)
    return r, g, b


def shard_from_params(shard: ShardParams, synthetic: SyntheticParams) -> Manifest:
    """``danet shard``: ``shard.dataset`` at ``shard.root`` -> shards at ``shard.out``."""
    return shard_dataset(
        reader_for(shard, synthetic),
        shard.splits,
        shard.out,
        max_count=shard.max_count,
        max_size_mb=shard.max_size_mb,
        image_format=shard.image_format,
        jpeg_quality=shard.jpeg_quality,
        workers=shard.workers,
        on_error=shard.on_error,
    )


def describe(manifest: Manifest, out: str, seconds: float) -> str:
    """What ``danet shard`` prints: a line per split, then where it went."""
    lines = []
    for split, info in manifest.splits.items():
        skipped = f", {len(info.skipped)} skipped" if info.skipped else ""
        kind = "" if info.labelled else " (images only: no labels)"
        lines.append(f"{split}: {info.samples} samples in {len(info.shards)} shards{kind}{skipped}")
    lines.append(
        f"wrote {out}/ ({manifest.dataset}, {manifest.num_classes} classes) in {seconds:.1f}s"
    )
    return "\n".join(lines)
