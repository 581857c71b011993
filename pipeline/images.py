"""Where bytes become pixels: the one decoder of the dataset readers, ``danet shard``, the
loader, ``danet predict``, ``danet explain`` and the served model, for images and label maps.

The parser is chosen by the file's signature among the formats a caller allows (the served
model: PNG and JPEG only), and the size is read from the header and checked before any pixel is
decoded, so a decompression bomb is refused with its size instead of PIL's generic warning; a
truncated file fails as it is decoded. Every failure is a ``ValueError`` with a one-line reason
(``TooLarge`` for the pixel limit), which the caller turns into its one-line error naming the
file or sample.

Pixels are what they say (``to_rgb``): every image becomes 8-bit RGB by these rules:

- 8-bit modes (L, RGB, P with or without transparency, CMYK, YCbCr, 1): PIL's conversion to RGB.
- Alpha (LA, RGBA, PA, P's transparency) is dropped, not composited: the colour channels as
  stored, which is what the loader has always trained on and what a viewer without a background
  shows for an opaque image.
- 16-bit (I;16, I;16B, and 32-bit I holding 0..65535, as PIL opens 16-bit PNG and TIFF
  grayscale) keeps its high byte (``>> 8``), as PIL's own 16-bit RGB (48-bit PNG) reading does,
  so a 16-bit ramp gives the 8-bit ramp; I values outside 0..65535 are refused, and so is a
  16-bit image whose values all stay below 4096 (8- or 12-bit data in a 16-bit file, which
  ``>> 8`` would turn into a black frame).
- Float (F) in [0, 1] becomes ``round(v * 255)``; anything else (NaN, negative, above 1: a
  depth map, a raw sensor value) is refused: its scale cannot be guessed.
- EXIF orientation (2..8) is applied: the image comes out upright, as a viewer shows it
  (``exif=False``: as stored -- the loader reads shards, whose images ``danet shard`` already
  turned upright, exactly as nvJPEG does on the GPU).
- Any other mode (LAB, HSV, multi-band TIFF) is refused with its name.

Label maps (``decode_label``) are index maps, never colours: L, P (the palette *indices*), I;16,
I;16B and I; a colour label is refused.
"""

from __future__ import annotations

import io
import os
import stat
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError, first_line

MAX_PIXELS = 50_000_000  # per image, read from the header before anything is decoded
PICTURE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")  # what danet predict reads


class TooLarge(ValueError):
    """More pixels than the limit, read from the header: nothing was decoded."""


class Unreadable(ValueError):
    """No allowed parser reads the bytes, or the file is truncated or corrupt."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"not {kind} ({reason})")
        self.reason = reason


class Unsupported(ValueError):
    """Pixels whose meaning cannot be guessed (a mode, a value range): refused, not converted."""


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
        try:  # a short file can break a signature check too (struct.error on b"")
            if accept is not None and not accept(head):
                continue
            return factory(io.BytesIO(data), "")
        except (OSError, SyntaxError, ValueError, IndexError, TypeError, EOFError, struct.error):
            continue  # the signature matched, the header did not parse: try the next parser
    raise ValueError("no image parser accepts it")


ORIENTATION = 0x0112  # the EXIF tag: 1 upright, 2..8 mirrored and/or rotated
LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")  # single-channel index maps
_EIGHT_BIT = ("1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "LA", "La", "PA", "CMYK", "YCbCr")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
LOW_RANGE = 4096  # a 16-bit image whose values all stay below this is refused, not darkened


def orientation(im: Any) -> int:
    """The EXIF orientation of an opened image (1 when it has none or a bad one)."""
    try:
        value = im.getexif().get(ORIENTATION, 1)
    except Exception:  # a malformed EXIF block: the pixels as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright_size(im: Any) -> tuple[int, int]:
    """(width, height) as the image is shown: swapped by an EXIF rotation of 90 degrees."""
    return (im.height, im.width) if orientation(im) >= 5 else (im.width, im.height)


def to_rgb(im: Any, exif: bool = True) -> np.ndarray:
    """A loaded PIL image -> (H, W, 3) uint8 by the module's rules; ``ValueError`` naming the
    mode or the value range it refuses."""
    from PIL import ImageOps

    if exif and orientation(im) != 1:
        im = ImageOps.exif_transpose(im)
    if im.mode in _EIGHT_BIT:
        rgb = np.array(im.convert("RGB"))
    elif im.mode in _SIXTEEN_BIT or im.mode == "I":
        values = np.asarray(im)
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if low < 0 or high > 0xFFFF:
            raise Unsupported(
                f"32-bit integer pixels from {low} to {high}: not 8- or 16-bit (save it as 8-bit RGB)"
            )
        if 0 < high < LOW_RANGE:  # >> 8 would give a black frame (max high >> 8) without a word
            raise Unsupported(
                f"16-bit pixels that reach only {high}: 12 bits or fewer hold the data (8- or "
                "12-bit values in a 16-bit file?), whose scale is unknown (save it as 8-bit RGB)"
            )
        rgb = np.repeat((values.astype(np.uint32) >> 8).astype(np.uint8)[..., None], 3, axis=2)
    elif im.mode == "F":
        values = np.asarray(im, dtype=np.float64)
        if values.size and not (
            np.isfinite(values).all() and 0 <= values.min() <= values.max() <= 1
        ):
            finite = values[np.isfinite(values)]
            lo, hi = (finite.min(), finite.max()) if finite.size else (np.nan, np.nan)
            raise Unsupported(
                f"float pixels from {lo:g} to {hi:g} (or not finite): only [0, 1] has a known "
                "scale (save it as 8-bit RGB)"
            )
        gray = np.rint(values * 255).astype(np.uint8)
        rgb = np.repeat(gray[..., None], 3, axis=2)
    else:
        raise Unsupported(f"pixel mode {im.mode} is not supported (save it as 8-bit RGB)")
    return np.ascontiguousarray(rgb)


def _opened(data: bytes, formats: Sequence[str] | None, limit: int | None, kind: str) -> Any:
    """The image of ``data``, its pixel count checked against ``limit`` (None: MAX_PIXELS)."""
    limit = limit or MAX_PIXELS
    try:
        im = open_image(data, formats)
    except ValueError as err:
        raise Unreadable(kind, str(err)) from None
    if im.width * im.height > limit:
        im.close()
        raise TooLarge(f"{im.width}x{im.height} is over the {limit:,} pixel limit")
    return im


def _load(im: Any, kind: str) -> None:
    """Decode the pixels; a truncated or corrupt file is ``Unreadable``. PIL's decoders raise
    many types on bad data (OSError, SyntaxError, EOFError, zlib and struct errors): all mean
    the bytes, not the code, are wrong."""
    try:
        im.load()
    except Exception as err:
        raise Unreadable(kind, f"truncated or corrupt: {first_line(err)}") from None


def decode_rgb(
    data: bytes,
    formats: Sequence[str] | None = PICTURE_FORMATS,
    max_pixels: int | None = None,
    kind: str = "a readable image",
    exif: bool = True,
) -> np.ndarray:
    """An encoded image -> (H, W, 3) uint8 (``to_rgb``'s rules). ``ValueError`` with the reason:
    "not <kind> (...)" for anything no allowed parser reads or a truncated file, ``TooLarge``
    ("WxH is over the N pixel limit") before decoding one larger than ``max_pixels`` (default
    ``MAX_PIXELS``), the mode or value range for pixels it will not guess."""
    with _opened(data, formats, max_pixels, kind) as im:
        _load(im, kind)
        return to_rgb(im, exif)


def decode_label(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """An encoded label map -> (H, W) its stored values (uint8, or a wider integer type for 16
    and 32 bits; a palette PNG's indices, never its colours). ``ValueError`` for a colour image,
    a truncated file, or more than ``max_pixels``."""
    with _opened(data, None, max_pixels, "a readable label") as im:
        _load(im, "a readable label")
        if im.mode not in LABEL_MODES:
            raise Unsupported(f"label must be a single-channel PNG, got mode {im.mode}")
        return np.array(im)


def image_size(data: bytes, max_pixels: int | None = None) -> tuple[int, int]:
    """(H, W) of an encoded image as stored, from its header (nothing decoded); ``TooLarge``
    past ``max_pixels`` (default ``MAX_PIXELS``), ``Unreadable`` when no parser reads it."""
    with _opened(data, None, max_pixels, "a readable image") as im:
        return im.height, im.width


def needs_conversion(data: bytes) -> bool:
    """Whether an image's stored pixels differ from ``to_rgb``'s (an EXIF rotation, a mode other
    than 8-bit L or RGB): ``danet shard`` stores such an image re-encoded, upright and 8-bit, so
    that the loader and nvJPEG read exactly the pixels every other stage sees."""
    with open_image(data) as im:
        return orientation(im) != 1 or im.mode not in ("L", "RGB")


def probe(data: bytes, path: str) -> tuple[str, tuple[int, int]]:
    """A dataset image's format ("png", "jpg", ...) and upright (width, height), fully decoded
    once by ``decode_rgb`` so a truncated, oversized or unsupported file is caught at sharding
    (``DataError`` naming ``path``)."""
    try:
        with open_image(data) as im:
            fmt, size = (im.format or Path(path).suffix.lstrip(".")).lower(), upright_size(im)
        decode_rgb(data, None)
    except TooLarge as err:
        raise DataError(path, f"too large to decode safely ({err})") from None
    except Unsupported as err:
        raise DataError(path, f"unsupported pixels: {err}") from None
    except Unreadable as err:
        raise DataError(path, f"unreadable or truncated image ({err.reason})") from None
    except ValueError as err:  # no parser at all (open_image)
        raise DataError(path, f"unreadable or truncated image ({err})") from None
    return {"jpeg": "jpg"}.get(fmt, fmt), size
