"""Where bytes become pixels: the one image reader of the dataset readers, ``danet predict``
and the served model.

The parser is chosen by the file's signature among the formats a caller allows (the served
model: PNG and JPEG only), and the size is read from the header and checked before any pixel is
decoded, so a decompression bomb is refused with its size instead of PIL's generic warning.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError

MAX_PIXELS = 50_000_000  # per image, read from the header before anything is decoded
PICTURE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")  # what danet predict reads


class TooLarge(ValueError):
    """More pixels than the limit, read from the header: nothing was decoded."""


def require_regular(path: str | Path) -> None:
    """A FIFO, device or socket would block or never end: anything but a regular file is
    refused unopened (``DataError`` naming the file)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DataError(str(path), "file does not exist") from None
    except OSError as err:
        raise DataError(str(path), f"cannot read ({err.strerror or err})") from None
    if not stat.S_ISREG(mode):
        raise DataError(
            str(path), "not a regular file (a FIFO, device or socket): refused unopened"
        )


def read_file(path: str | Path) -> bytes:
    """A dataset's or a user's image file as bytes, once ``require_regular`` allowed it."""
    require_regular(path)
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise DataError(str(path), f"cannot read ({err.strerror or err})") from None


def open_image(data: bytes, formats: Sequence[str] | None = None) -> Any:
    """The PIL image of ``data``, header parsed, no pixel decoded, by the first allowed format
    whose signature matches (``formats`` None: every format PIL knows). ``ValueError`` if none
    does. PIL's plugin classes are used directly: ``Image.open`` would run its decompression-bomb
    check before the caller could say how large the image is."""
    from PIL import Image

    Image.init()
    head = data[:16]
    for name in formats or list(Image.OPEN):
        factory, accept = Image.OPEN[name]
        if accept is not None and not accept(head):
            continue
        try:
            return factory(io.BytesIO(data), "")
        except (OSError, SyntaxError, ValueError, IndexError, TypeError):
            continue  # the signature matched, the header did not parse: try the next parser
    raise ValueError("no image parser accepts it")


def decode_rgb(
    data: bytes,
    formats: Sequence[str] | None = PICTURE_FORMATS,
    max_pixels: int | None = None,
    kind: str = "a readable image",
) -> np.ndarray:
    """An encoded image -> (H, W, 3) uint8. ``ValueError`` with the reason: "not <kind> (...)"
    for anything no allowed parser reads, ``TooLarge`` ("WxH is over the N pixel limit") before
    decoding one larger than ``max_pixels`` (default ``MAX_PIXELS``)."""
    limit = max_pixels or MAX_PIXELS
    try:
        with open_image(data, formats) as im:
            if im.width * im.height > limit:
                raise TooLarge(f"{im.width}x{im.height} is over the {limit:,} pixel limit")
            im.load()  # a truncated file fails here
            return np.array(im.convert("RGB"))
    except TooLarge:
        raise
    except ValueError as err:
        raise ValueError(f"not {kind} ({err})") from None
    except (OSError, SyntaxError) as err:  # PIL raises SyntaxError on bad headers
        raise ValueError(f"not {kind} ({type(err).__name__})") from None


def probe(data: bytes, path: str) -> tuple[str, tuple[int, int]]:
    """A dataset image's format ("png", "jpg", ...) and (width, height), fully decoded once so a
    truncated file is caught at sharding (``DataError`` naming ``path``)."""
    try:
        with open_image(data) as im:
            im.load()
            fmt, size = (im.format or Path(path).suffix.lstrip(".")).lower(), im.size
    except Exception as err:
        raise DataError(path, f"unreadable or truncated image ({err})") from None
    return {"jpeg": "jpg"}.get(fmt, fmt), size
