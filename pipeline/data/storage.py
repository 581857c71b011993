"""Where shards live: a local path, or a URL (s3://, gs://, https://, any fsspec protocol, pipe:).

Credentials and endpoints come from each protocol's standard environment (for S3:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...), as fsspec reads them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from pipeline.errors import DataError


def is_url(location: str | Path) -> bool:
    return "://" in str(location) or str(location).startswith("pipe:")


def join(location: str | Path, name: str) -> str:
    """``location/name`` for a folder path or a URL prefix."""
    return f"{str(location).rstrip('/')}/{name}" if is_url(location) else str(Path(location) / name)


@contextmanager
def open_binary(url: str) -> Iterator[IO[bytes]]:
    """A file or URL opened for reading bytes."""
    if str(url).startswith("pipe:"):
        import webdataset as wds

        stream = wds.gopen(url, "rb")
        try:
            yield stream
        finally:
            stream.close()
        return
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
