"""Is a location a URL or a local path: the one test every module makes. Locations are data,
never code: webdataset's ``pipe:`` (a shell command that would run with the location's text) is
refused wherever a location is opened. A name that becomes part of a path (a run, a split, a
registered model) is one plain segment (``check_name``)."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.errors import ConfigError, DataError

# One plain path segment: what runs, searches, splits and registered models may be called.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


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


def check_name(value: str, key: str) -> None:
    """``value`` is one safe path segment (letters, digits, ``.``, ``_``, ``-``; no ``..``);
    ``key`` is the param that gives it."""
    if not SAFE_NAME.match(value) or ".." in value:
        raise ConfigError(
            f"{key} {value!r}: must be one plain name (letters, digits, '.', '_', '-'), not a path"
        )
