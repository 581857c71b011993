"""Is a location a URL or a local path: the one test every module makes."""

from __future__ import annotations

from pathlib import Path


def is_url(location: str | Path) -> bool:
    """A location with a protocol (``s3://``, ``gs://``, ``https://``: fsspec's reading of it) or
    webdataset's ``pipe:`` command, not a local path."""
    from fsspec.core import split_protocol

    text = str(location)
    return split_protocol(text)[0] is not None or text.startswith("pipe:")
