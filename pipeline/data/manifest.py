"""``manifest.json``: what a shard folder holds, as typed records, checked when it is opened.

``danet shard`` writes it last, beside the shards: the class table and palette, per split the
shards with their sha256 and size, sample counts, per-class pixel counts, skipped samples, and
the mean/std of the normalisation split. Readers get a ``Manifest``; every missing or malformed
key is a ``DataError`` naming the manifest and the key, and a shard whose size differs from the
manifest's is refused before any work starts (its content digest is checked as it is read, see
pipeline/data/loader.py).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

from pipeline.data.storage import join
from pipeline.errors import DataError
from pipeline.locations import is_url, refuse_code

MANIFEST = "manifest.json"
MANIFEST_VERSION = 3


class ShardRef(NamedTuple):
    """A shard to read, the sha256 its content must have and the samples it must hold ("" and
    -1: not checked, for a shard named by hand), and whether its samples have labels."""

    url: str
    sha256: str = ""
    samples: int = -1
    labelled: bool = True


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Skipped:
    path: str
    error: str


@dataclass(frozen=True)
class SplitInfo:
    samples: int
    shards: tuple[ShardInfo, ...]
    class_pixels: tuple[int, ...]  # per class, in class order
    ignore_pixels: int
    min_size: tuple[int, int]  # (width, height)
    max_size: tuple[int, int]
    skipped: tuple[Skipped, ...] = ()
    class_image_pixels: tuple[int, ...] = ()  # per class: pixels of the images that contain it
    labelled: bool = True  # False: images only (a test set), every pixel count is 0


@dataclass(frozen=True)
class Manifest:
    version: int
    dataset: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_rule: str
    image_format: str
    mean: tuple[float, float, float]  # RGB in [0, 1], of the normalisation split
    std: tuple[float, float, float]
    normalization_split: str
    splits: dict[str, SplitInfo]
    location: str = field(default="", compare=False)  # the shard folder (or URL) it came from
    sha256: str = field(default="", compare=False)  # of the manifest file: the data's identity

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise DataError(
                f"{self.location}/{MANIFEST}",
                f"has no split {name!r}; it has {', '.join(self.splits)}",
            )
        return self.splits[name]

    def labelled_split(self, name: str, param: str) -> SplitInfo:
        """The split ``param`` names, refused in one line when it holds images only."""
        info = self.split(name)
        if not info.labelled:
            raise DataError(
                f"{self.location}/{MANIFEST}",
                f"split {name!r} holds images only (no labels): {param} needs a labelled split "
                f"(predict it: danet predict --shards {self.location} --split {name})",
            )
        return info

    def split_digest(self, name: str) -> str:
        """The identity of one split's data: a digest of its shards' digests."""
        shards = self.split(name).shards
        return hashlib.sha256("".join(s.sha256 for s in shards).encode()).hexdigest()

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("location")
        data.pop("sha256")
        return json.dumps(data, indent=2) + "\n"


SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _shard_from(data: dict[str, Any], where: str) -> ShardInfo:
    """One shard's entry: a plain file name in the shard folder, a sha256, its counts."""
    shard = ShardInfo(
        name=str(data["name"]),
        samples=int(data["samples"]),
        sha256=str(data["sha256"]),
        bytes=int(data["bytes"]),
    )
    name = shard.name
    if PurePosixPath(name).name != name or name in (".", "..") or "\\" in name or not name:
        raise DataError(where, f"shard name {name!r} is not a plain file name in the shard folder")
    if not SHA256.match(shard.sha256):
        raise DataError(where, f"shard {name}: sha256 {shard.sha256!r} is not a sha256 digest")
    if shard.samples < 1 or shard.bytes < 1:
        raise DataError(where, f"shard {name}: {shard.samples} samples in {shard.bytes} bytes")
    return shard


def _split_from(data: dict[str, Any], where: str) -> SplitInfo:
    shards = tuple(_shard_from(s, where) for s in data["shards"])
    if int(data["samples"]) != sum(s.samples for s in shards):
        raise DataError(
            where,
            f"a split counts {data['samples']} samples but its shards hold "
            f"{sum(s.samples for s in shards)}",
        )
    return SplitInfo(
        samples=int(data["samples"]),
        shards=shards,
        class_pixels=tuple(int(v) for v in data["class_pixels"]),
        ignore_pixels=int(data["ignore_pixels"]),
        min_size=(int(data["min_size"][0]), int(data["min_size"][1])),
        max_size=(int(data["max_size"][0]), int(data["max_size"][1])),
        skipped=tuple(Skipped(**s) for s in data.get("skipped", ())),
        class_image_pixels=tuple(int(v) for v in data.get("class_image_pixels", ())),
        labelled=bool(data.get("labelled", True)),
    )


def _rgb(values: Any) -> tuple[float, float, float]:
    r, g, b = (float(v) for v in values)
    return r, g, b


def manifest_from_json(text: str | bytes, where: str, location: str = "") -> Manifest:
    """Parse a manifest; any missing or malformed key is one DataError naming it."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(where, f"manifest is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise DataError(where, "manifest is not a JSON object")
    if data.get("version") != MANIFEST_VERSION:
        raise DataError(
            where,
            f"manifest version {data.get('version')} is not {MANIFEST_VERSION}: re-run `danet shard`",
        )
    key = "?"
    try:
        for key in ("dataset", "classes", "palette", "mean", "std", "splits"):
            data[key]
        splits = {}
        for key, split in data["splits"].items():
            splits[key] = _split_from(split, where)
        key = "palette"
        palette = tuple((int(c[0]), int(c[1]), int(c[2])) for c in data["palette"])
        key = "mean/std"
        mean, std = (_rgb(data[k]) for k in ("mean", "std"))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        raise DataError(where, f"manifest key {key!r} is missing or malformed ({err})") from None
    raw = text if isinstance(text, bytes) else text.encode()
    return Manifest(
        version=MANIFEST_VERSION,
        dataset=str(data["dataset"]),
        classes=tuple(str(c) for c in data["classes"]),
        palette=palette,
        ignore_rule=str(data.get("ignore_rule", "")),
        image_format=str(data.get("image_format", "")),
        mean=mean,
        std=std,
        normalization_split=str(data.get("normalization_split", "")),
        splits=splits,
        location=location,
        sha256=hashlib.sha256(raw).hexdigest(),
    )


def load_manifest(location: str | Path) -> Manifest:
    """The manifest of a shard folder (a path or a URL prefix; never a command)."""
    refuse_code(location)
    path = join(location, MANIFEST)
    if is_url(location):
        import fsspec

        try:
            with fsspec.open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise DataError(
                path, "shard manifest does not exist (run `danet shard` first)"
            ) from None
    elif Path(path).is_file():
        data = Path(path).read_bytes()
    else:
        raise DataError(path, "shard manifest does not exist (run `danet shard` first)")
    # absolute: Ray workers run in other working directories
    where = str(location) if is_url(location) else str(Path(location).resolve())
    return manifest_from_json(data, path, where)


def shard_refs(manifest: Manifest, split: str) -> list[ShardRef]:
    """The shards of a split, each checked to exist with the manifest's size."""
    info = manifest.split(split)
    infos = info.shards
    refs = [
        ShardRef(join(manifest.location, s.name), s.sha256, s.samples, info.labelled) for s in infos
    ]
    for ref, shard, size in zip(refs, infos, _sizes([r.url for r in refs]), strict=True):
        if size is None:
            raise DataError(ref.url, "shard is missing")
        if size >= 0 and size != shard.bytes:
            raise DataError(
                ref.url,
                f"shard has {size} bytes, the manifest says {shard.bytes}: truncated or replaced",
            )
    return refs


def _sizes(urls: list[str]) -> list[int | None]:
    """Each file's size; None = missing, -1 = cannot be known."""
    if not urls:
        return []
    for url in urls:  # a manifest from someone else may name a command: never run it
        refuse_code(url)
    if not is_url(urls[0]):
        return [Path(u).stat().st_size if Path(u).is_file() else None for u in urls]
    import fsspec

    fs, _ = fsspec.core.url_to_fs(urls[0])
    sizes: list[int | None] = []
    for url in urls:
        try:
            sizes.append(int(fs.size(url)))
        except FileNotFoundError:
            sizes.append(None)
    return sizes
