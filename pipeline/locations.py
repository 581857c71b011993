"""Is a location a URL or a local path: the one test every module makes. Locations are data,
never code: webdataset's ``pipe:`` (a shell command that would run with the location's text) is
refused wherever a location is opened."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import DataError


def is_url(location: str | Path) -> bool:
    """A location with a protocol (``s3://``, ``gs://``, ``https://``: fsspec's reading of it),
    not a local path."""
    from fsspec.core import split_protocol

    return split_protocol(str(location))[0] is not None


def refuse_code(location: str | Path) -> None:
    """``DataError`` for a location that would run a command (``pipe:``) rather than name data."""
    if str(location).lstrip().lower().startswith("pipe:"):
        raise DataError(
            str(location),
            "a shell command (webdataset's pipe:), not a location: give a path or an fsspec "
            "URL (s3://, gs://, https://)",
        )
