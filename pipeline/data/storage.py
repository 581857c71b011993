"""Where shards live: a local path, or a URL (s3://, gs://, https://, any fsspec protocol); never
a command (``pipe:`` is refused: pipeline/locations.py).

Credentials and endpoints come from each protocol's standard environment (for S3:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...), as fsspec reads them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from pipeline.errors import DataError
from pipeline.locations import is_url, refuse_code


def join(location: str | Path, name: str) -> str:
    """``location/name`` for a folder path or a URL prefix."""
    return f"{str(location).rstrip('/')}/{name}" if is_url(location) else str(Path(location) / name)


def publish(local: Path, manifest: Any, out: str) -> Any:
    """Upload the shards of ``local`` to the URL prefix ``out`` for readers that may be reading it.

    There is no atomic rename in object storage, so each shard goes up under a content-addressed
    name (``train-000000-<sha256[:12]>.tar``: the bytes are the local shard's), then the manifest
    naming them, last, in one PUT; then the shards no manifest names any more are removed. A
    reader sees the old set or the new one, never half of one.
    """
    import dataclasses

    import fsspec

    fs, root = fsspec.core.url_to_fs(out)
    renamed = {}
    for split, info in manifest.splits.items():
        shards = []
        for shard in info.shards:
            name = f"{shard.name.removesuffix('.tar')}-{shard.sha256[:12]}.tar"
            if not fs.exists(f"{root}/{name}"):  # content-addressed: the same bytes are there
                fs.put_file(str(local / shard.name), f"{root}/{name}")
            shards.append(dataclasses.replace(shard, name=name))
        renamed[split] = dataclasses.replace(info, shards=tuple(shards))
    published = dataclasses.replace(manifest, splits=renamed, location=out)
    with fs.open(f"{root}/manifest.json", "wb") as f:
        f.write(published.to_json().encode())
    keep = {s.name for info in renamed.values() for s in info.shards}
    for path in fs.glob(f"{root}/*.tar"):
        if path.rsplit("/", 1)[-1] not in keep:
            fs.rm_file(path)
    return published


@contextmanager
def open_binary(url: str) -> Iterator[IO[bytes]]:
    """A file or URL opened for reading bytes."""
    refuse_code(url)
    try:
        if is_url(url):
            import fsspec

            f = fsspec.open(url, "rb").open()
        else:
            f = open(url, "rb")  # noqa: SIM115 -- closed below
    except FileNotFoundError:
        raise DataError(url, "file is missing") from None
    with f:
        yield f
