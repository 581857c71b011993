"""Raw dataset -> WebDataset tar shards per split, plus manifest.json.

Each sample is ``{key}.{png|jpg}`` (the image, in its original encoding or re-encoded to JPEG),
``{key}.seg.png`` (a single-channel PNG of train ids, 255 = ignore; never a palette PNG) and
``{key}.json`` (source and size). Shards are ``{split}-%06d.tar``, closed at ``max_count`` samples
or ``max_size_mb``. Tar entries have ``mtime=0`` and fixed owner and mode, and samples keep the
reader's sorted order, so the same input and params give byte-identical shards: DVC relies on it.

The output directory appears atomically: everything is written to a temporary sibling and renamed
into place at the end, so an interrupted or failed run leaves the previous output untouched.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from pipeline.atomic import replace_dir
from pipeline.datasets import DataError, Item, Reader, Sample

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2


@dataclass(frozen=True)
class Encoded:
    """One sample ready for the tar, with the statistics the manifest needs."""

    key: str
    files: dict[str, bytes]
    class_pixels: np.ndarray  # (K + 1,): per class, then ignore
    rgb_sum: np.ndarray  # (3,) float64 over pixels, values in [0, 1]
    rgb_sq_sum: np.ndarray
    pixels: int
    size: tuple[int, int]  # (width, height)


def encode_sample(
    sample: Sample, num_classes: int, image_format: str, jpeg_quality: int, root: str
) -> Encoded:
    """Sample -> tar members and stats (runs in worker processes)."""
    image = Image.open(io.BytesIO(sample.image_bytes)).convert("RGB")
    image_bytes, fmt = sample.image_bytes, sample.image_format
    if (image_format == "jpg" and fmt != "jpg") or fmt not in ("jpg", "png"):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=jpeg_quality)
        image_bytes, fmt = buffer.getvalue(), "jpg"
    label_buffer = io.BytesIO()
    Image.fromarray(sample.label, mode="L").save(label_buffer, format="PNG", compress_level=6)
    source = sample.source
    if root and source.startswith(root):  # relative: the same data elsewhere gives the same bytes
        source = os.path.relpath(source, root)
    meta = {"source": source, "width": image.width, "height": image.height}
    counts = np.bincount(sample.label.ravel(), minlength=256).astype(np.int64)
    rgb = np.asarray(image, dtype=np.float64) / 255.0
    return Encoded(
        key=sample.key,
        files={
            fmt: image_bytes,
            "seg.png": label_buffer.getvalue(),
            "json": json.dumps(meta, sort_keys=True).encode(),
        },
        class_pixels=np.append(counts[:num_classes], counts[255]),
        rgb_sum=rgb.reshape(-1, 3).sum(0),
        rgb_sq_sum=np.square(rgb).reshape(-1, 3).sum(0),
        pixels=image.width * image.height,
        size=(image.width, image.height),
    )


@dataclass(frozen=True)
class _Job:
    """Picklable work unit: read + encode one item; errors come back as values, not raised."""

    reader: Reader
    image_format: str
    jpeg_quality: int

    def __call__(self, item: Item) -> Encoded | DataError:
        try:
            sample = self.reader.read(item)
            return encode_sample(
                sample,
                self.reader.info.num_classes,
                self.image_format,
                self.jpeg_quality,
                str(self.reader.root),
            )
        except DataError as err:
            return err


class ShardSink:
    """Writes samples into ``{split}-%06d.tar`` files with deterministic tar metadata."""

    def __init__(self, directory: Path, split: str, max_count: int, max_bytes: int) -> None:
        self.directory, self.split = directory, split
        self.max_count, self.max_bytes = max_count, max_bytes
        self.shards: list[dict[str, Any]] = []
        self._writer: wds.TarWriter | None = None
        self._file: io.BufferedWriter | None = None
        self._count = self._bytes = 0

    def write(self, sample: Encoded) -> None:
        if self._writer is None or self._count >= self.max_count or self._bytes >= self.max_bytes:
            self._close()
            name = f"{self.split}-{len(self.shards):06d}.tar"
            self._file = open(self.directory / name, "wb")  # noqa: SIM115 -- closed in _close
            self._writer = wds.TarWriter(
                self._file, user="", group="", mode=0o444, mtime=0, encoder=False,
                format=tarfile.USTAR_FORMAT,
            )  # fmt: skip
            self.shards.append({"name": name, "samples": 0})
            self._count = self._bytes = 0
        self._bytes += self._writer.write({"__key__": sample.key, **sample.files})
        self._count += 1
        self.shards[-1]["samples"] += 1

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            assert self._file is not None
            self._file.close()
            path = self.directory / self.shards[-1]["name"]
            self.shards[-1]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            self.shards[-1]["bytes"] = path.stat().st_size
            self._writer = None

    def close(self) -> list[dict[str, Any]]:
        self._close()
        return self.shards

    def abort(self) -> None:
        """Close without hashing, after an error (the partial output is discarded)."""
        if self._writer is not None:
            self._writer.close()
            assert self._file is not None
            self._file.close()
            self._writer = None


def _encoded(
    items: list[Item], job: _Job, workers: int, desc: str
) -> Iterator[Encoded | DataError]:
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=None)
    try:
        if workers <= 1:
            for item in items:
                yield job(item)
                bar.update()
        else:
            with ProcessPoolExecutor(workers) as pool:
                for result in pool.map(
                    job, items, chunksize=max(1, min(16, len(items) // (4 * workers)))
                ):
                    yield result
                    bar.update()
    finally:
        bar.close()


def shard_dataset(
    reader: Reader,
    splits: tuple[str, ...],
    out: Path,
    max_count: int = 100,
    max_size_mb: float = 256.0,
    image_format: str = "original",
    jpeg_quality: int = 95,
    workers: int = 1,
    on_error: str = "fail",
) -> dict[str, Any]:
    """Write shards and manifest for ``splits`` of ``reader`` into ``out`` (replaced atomically).

    Raises:
        DataError: the first bad sample when ``on_error == "fail"``; nothing is written then.
    """
    info = reader.info
    items_by_split = {split: reader.items(split) for split in splits}  # fail fast on layout errors
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest_splits = {}
        job = _Job(reader, image_format, jpeg_quality)
        stats = {}
        for split, items in items_by_split.items():
            sink = ShardSink(tmp, split, max_count, int(max_size_mb * 2**20))
            class_pixels = np.zeros(info.num_classes + 1, dtype=np.int64)
            rgb_sum, rgb_sq, pixels = np.zeros(3), np.zeros(3), 0
            skipped = []
            sizes: set[tuple[int, int]] = set()
            try:
                for result in _encoded(items, job, workers, f"shard {split}"):
                    if isinstance(result, DataError):
                        if on_error == "fail":
                            raise result
                        skipped.append({"path": result.path, "error": result.problem})
                        continue
                    sink.write(result)
                    class_pixels += result.class_pixels
                    rgb_sum += result.rgb_sum
                    rgb_sq += result.rgb_sq_sum
                    pixels += result.pixels
                    sizes.add(result.size)
            except BaseException:
                sink.abort()
                raise
            shards = sink.close()
            if not shards:
                raise DataError(out, f"split {split!r} has no valid samples left")
            stats[split] = (rgb_sum, rgb_sq, pixels)
            manifest_splits[split] = {
                "samples": sum(s["samples"] for s in shards),
                "shards": shards,
                "class_pixels": class_pixels[:-1].tolist(),
                "ignore_pixels": int(class_pixels[-1]),
                "min_size": [min(w for w, _ in sizes), min(h for _, h in sizes)],
                "max_size": [max(w for w, _ in sizes), max(h for _, h in sizes)],
                "skipped": skipped,
            }
        norm_split = "train" if "train" in stats else next(iter(stats))
        rgb_sum, rgb_sq, pixels = stats[norm_split]
        mean = rgb_sum / pixels
        std = np.sqrt(np.maximum(rgb_sq / pixels - mean**2, 0.0))
        manifest = {
            "version": MANIFEST_VERSION,
            "dataset": info.name,
            "classes": list(info.classes),
            "palette": [list(c) for c in info.palette],
            "ignore_index": 255,
            "ignore_rule": info.ignore_rule,
            "image_format": image_format,
            "mean": [round(float(v), 6) for v in mean],
            "std": [round(float(v), 6) for v in std],
            "normalization_split": norm_split,
            "splits": manifest_splits,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(tmp, out)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataError(path, "shard manifest does not exist (run `danet shard` first)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(path, f"manifest is not valid JSON ({err})") from None
    if manifest.get("version") != MANIFEST_VERSION:
        raise DataError(
            path,
            f"manifest version {manifest.get('version')} is not {MANIFEST_VERSION}: re-run `danet shard`",
        )
    return manifest


def shard_urls(directory: str | Path, manifest: dict[str, Any], split: str) -> list[str]:
    """The shard paths of a split, checking that they exist and are non-empty."""
    if split not in manifest["splits"]:
        raise DataError(
            Path(directory) / MANIFEST,
            f"has no split {split!r}; it has {', '.join(manifest['splits'])}",
        )
    urls = []
    for shard in manifest["splits"][split]["shards"]:
        path = Path(directory) / shard["name"]
        if not path.is_file() or path.stat().st_size == 0:
            raise DataError(path, "shard is missing or empty")
        urls.append(str(path))
    return urls
