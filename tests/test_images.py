"""The one decoder (pipeline/images.py): pixels are what they say, in every stage that reads them.

Each unusual pixel format is written as a real file and decoded; the expected 8-bit RGB is
computed independently (a ramp, PIL's own conversion, a rotation of the stored pixels).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import images
from pipeline.data.loader import decode_image, iter_raw, read_shard
from pipeline.data.readers import make_reader
from pipeline.data.shard import shard_dataset
from pipeline.errors import DataError
from pipeline.images import TooLarge, Unreadable, Unsupported, decode_label, decode_rgb, probe

RAMP = np.arange(256, dtype=np.uint8).reshape(16, 16)


def encode(im: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png48(rgb16: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one), written chunk by chunk."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\0" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def gray(rgb: np.ndarray) -> np.ndarray:
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    return rgb[..., 0]


@pytest.mark.parametrize("low", [0, 255], ids=["k*256", "k*256+255"])
def test_a_16_bit_ramp_gives_the_8_bit_ramp(low: int) -> None:
    data = encode(Image.fromarray(RAMP.astype(np.uint16) * 256 + low))  # I;16 PNG
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    assert (gray(decode_rgb(data)) == RAMP).all()


@pytest.mark.parametrize("top", [255, 4095])
def test_8_or_12_bit_values_in_a_16_bit_file_are_refused_not_darkened(top: int) -> None:
    """>> 8 would turn them into a black frame (max 0 or 15) and exit 0: one line instead; an
    all-black 16-bit image stays black."""
    values = np.linspace(0, top, 64).astype(np.uint16).reshape(8, 8)
    with pytest.raises(Unsupported, match=rf"16-bit pixels that reach only {top}: 12 bits"):
        decode_rgb(encode(Image.fromarray(values)))
    assert not decode_rgb(encode(Image.fromarray(np.zeros((8, 8), np.uint16)))).any()


def test_big_endian_16_bit_and_32_bit_int_keep_the_high_byte() -> None:
    values = RAMP.astype(np.uint16) * 257
    big = Image.frombytes("I;16B", (16, 16), values.astype(">u2").tobytes())
    assert (gray(images.to_rgb(big)) == RAMP).all()
    tiff = encode(Image.fromarray(values.astype(np.int32)), "TIFF")  # mode I
    assert (gray(decode_rgb(tiff)) == RAMP).all()
    beyond = encode(Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)), "TIFF")
    with pytest.raises(Unsupported, match=r"32-bit integer pixels from 70000 to 70000"):
        decode_rgb(beyond)


def test_a_48_bit_png_gives_each_channels_high_byte() -> None:
    wide = RAMP.astype(np.uint16)
    rgb16 = np.stack([wide * 256 + 255, wide[::-1] * 257, np.full_like(wide, 7 * 256)], -1)
    out = decode_rgb(png48(rgb16))
    assert (out == np.stack([RAMP, RAMP[::-1], np.full_like(RAMP, 7)], -1)).all()


def test_float_pixels_in_0_1_are_scaled_and_others_refused() -> None:
    ramp = RAMP.astype(np.float32) / 255
    assert (gray(decode_rgb(encode(Image.fromarray(ramp), "TIFF"))) == RAMP).all()
    for bad, text in (
        (ramp * 255, "from 0 to 255"),
        (ramp - 0.5, "from -0.5 to"),
        (ramp * np.nan, ""),
    ):
        with pytest.raises(Unsupported, match=f"float pixels {text}.*only \\[0, 1\\]"):
            decode_rgb(encode(Image.fromarray(bad.astype(np.float32)), "TIFF"))


@pytest.mark.parametrize("transparency", [False, True])
def test_palette_images_give_their_colours(transparency: bool) -> None:
    palette = np.random.default_rng(0).integers(0, 256, (256, 3), dtype=np.uint8)
    im = Image.fromarray(RAMP, mode="L").convert("P")
    im.putpalette(palette.ravel().tolist())
    data = encode(im, transparency=3) if transparency else encode(im)
    assert (decode_rgb(data) == palette[RAMP]).all()


def test_cmyk_equals_pils_rgb_conversion() -> None:
    cmyk = np.random.default_rng(1).integers(0, 256, (6, 8, 4), dtype=np.uint8)
    data = encode(Image.fromarray(cmyk, mode="CMYK"), "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "CMYK"
        expected = np.array(im.convert("RGB"))
    assert (decode_rgb(data) == expected).all()


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_is_dropped_not_composited(mode: str) -> None:
    rgb = np.random.default_rng(2).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    alpha = np.zeros((6, 8, 1), dtype=np.uint8)  # fully transparent: the colours still come back
    if mode == "LA":
        array, expected = np.concatenate([rgb[..., :1], alpha], -1), np.repeat(rgb[..., :1], 3, -1)
    else:
        array, expected = np.concatenate([rgb, alpha], -1), rgb
    assert (decode_rgb(encode(Image.fromarray(array, mode=mode))) == expected).all()


def exif_block(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[images.ORIENTATION] = orientation
    return exif.tobytes()


def exif_jpeg(pixels: np.ndarray, orientation: int) -> bytes:
    return encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif_block(orientation))


def test_an_exif_orientation_6_jpeg_comes_out_rotated() -> None:
    pixels = np.zeros((16, 32, 3), dtype=np.uint8)
    pixels[:8, :8] = 255  # a white top-left corner, as stored
    data = exif_jpeg(pixels, 6)
    stored = decode_rgb(data, exif=False)
    upright = decode_rgb(data)
    assert stored.shape == (16, 32, 3) and upright.shape == (32, 16, 3)
    assert (upright == np.rot90(stored, -1)).all()  # 6: turned 90 degrees clockwise to view
    assert upright[:8, -8:].mean() > 200 and upright[-8:, :8].mean() < 50
    assert probe(data, "x.jpg") == ("jpg", (16, 32))  # the upright (width, height)


def test_truncated_oversized_and_foreign_bytes_are_one_line() -> None:
    data = encode(
        Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    )
    with pytest.raises(Unreadable, match=r"^not a readable image \(truncated or corrupt: .*\)$"):
        decode_rgb(data[: len(data) // 2])
    with pytest.raises(TooLarge, match=r"64x64 is over the 100 pixel limit"):
        decode_rgb(data, max_pixels=100)
    with pytest.raises(Unreadable, match="no image parser accepts it"):
        decode_rgb(b"not an image at all")
    with pytest.raises(DataError, match=r"s-000000\.tar:k7: bad image \(not a readable image"):
        decode_image(data[:100], "s-000000.tar:k7")
    with pytest.raises(DataError, match=r"x\.png: unsupported pixels: pixel mode LAB"):
        probe(encode(Image.new("LAB", (4, 4)), "TIFF"), "x.png")


def test_labels_are_indices_never_colours() -> None:
    im = Image.fromarray(RAMP, mode="L").convert("P")
    im.putpalette([255 - (i % 256) for i in range(768)])  # colours unlike the indices
    assert (decode_label(encode(im)) == RAMP).all()
    wide = decode_label(encode(Image.fromarray(RAMP.astype(np.uint16))))  # a 16-bit index map
    assert (wide == RAMP).all()
    with pytest.raises(Unsupported, match="single-channel PNG, got mode RGB"):
        decode_label(encode(Image.new("RGB", (4, 4))))
    with pytest.raises(TooLarge):
        decode_label(encode(im), max_pixels=10)


def folder_dataset(root: Path, files: dict[str, bytes], size: tuple[int, int]) -> None:
    (root / "images" / "val").mkdir(parents=True)
    (root / "masks" / "val").mkdir(parents=True)
    (root / "classes.txt").write_text("a\nb\n")
    w, h = size
    for name, data in files.items():
        (root / "images" / "val" / name).write_bytes(data)
        label = Image.fromarray((np.arange(w * h).reshape(h, w) % 2).astype(np.uint8), mode="L")
        label.save(root / "masks" / "val" / f"{Path(name).stem}.png")


def test_shards_store_upright_8_bit_pixels_and_keep_ordinary_bytes(tmp_path: Path) -> None:
    """A 16-bit PNG and an EXIF-rotated JPEG are re-encoded upright and 8-bit (what the loader
    and nvJPEG then read equals what predict reads); ordinary 8-bit files go in byte for byte."""
    rng = np.random.default_rng(4)
    square = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    smooth = np.repeat(np.linspace(0, 255, 16, dtype=np.uint8)[None, :, None], 16, 0)
    files = {
        "deep.png": encode(Image.fromarray(RAMP.astype(np.uint16) * 257)),
        "turned.jpg": exif_jpeg(np.repeat(smooth, 3, 2), 6),
        "turned2.png": encode(Image.fromarray(square), exif=exif_block(8)),
        "plain.png": encode(Image.fromarray(square)),
        "plain2.jpg": encode(Image.fromarray(square), "JPEG", quality=90),
    }
    folder_dataset(tmp_path / "data", files, (16, 16))
    shard_dataset(make_reader("folder", tmp_path / "data"), ("val",), tmp_path / "shards")
    tar = sorted((tmp_path / "shards").glob("val-*.tar"))[0]
    stored = {raw.key: raw for raw in iter_raw(str(tar))}
    assert stored["plain"].image == files["plain.png"]
    assert stored["plain2"].image == files["plain2.jpg"]
    assert stored["deep"].image_format == "png" and stored["turned"].image_format == "jpg"
    decoded = {key: image for key, image, _ in read_shard(str(tar))}
    assert (gray(decoded["deep"]) == RAMP).all()
    upright = decode_rgb(files["turned.jpg"])
    assert np.abs(decoded["turned"].astype(int) - upright).max() <= 2  # re-encoded once, q95
    assert (decoded["turned2"] == np.rot90(square, 1)).all()  # 8: turned 90 degrees back
    assert stored["turned2"].image_format == "png"  # lossless stays lossless
    for key in ("plain", "plain2"):
        assert (decoded[key] == decode_rgb(files[f"{key}.{stored[key].image_format}"])).all()
    with Image.open(io.BytesIO(stored["turned"].image)) as im:
        assert images.orientation(im) == 1  # nothing left for nvJPEG to ignore


def test_a_label_that_fits_the_stored_not_the_upright_image_is_refused(tmp_path: Path) -> None:
    pixels = np.zeros((16, 32, 3), dtype=np.uint8)
    folder_dataset(tmp_path / "data", {"t.jpg": exif_jpeg(pixels, 6)}, (32, 16))
    with pytest.raises(
        DataError, match=r"label is 32x16 but its image is 16x32 upright \(its EXIF"
    ):
        shard_dataset(make_reader("folder", tmp_path / "data"), ("val",), tmp_path / "shards")
